"""`python -m timar_sdk.serve`: timar-serve (what timar-loadtest starts in a subprocess)."""
from timar_sdk.serve.cli import serve_cmd

serve_cmd()
