/** The runtime's errors, named as in timar_sdk/errors.py, and Python-style formatting helpers
 * so that messages read exactly as the Python runtime's. */

/** Bad input to the API; the session is unchanged. */
export class TimarInputError extends Error {
  constructor(message) { super(message); this.name = 'TimarInputError'; }
}

/** The model failed at run time (e.g. NaN output); the session is unchanged. */
export class TimarRuntimeError extends Error {
  constructor(message) { super(message); this.name = 'TimarRuntimeError'; }
}

/** A bundle that cannot be used; the message names the file. */
export class BundleError extends Error {
  constructor(message) { super(message); this.name = 'BundleError'; }
}

/** Python's repr() of a JS value as far as error messages need it. */
export function pyRepr(value) {
  if (value === null || value === undefined) return 'None';
  if (value === true) return 'True';
  if (value === false) return 'False';
  if (typeof value === 'string') return `'${value}'`;
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number') {
    if (Number.isNaN(value)) return 'nan';
    if (!Number.isFinite(value)) return value > 0 ? 'inf' : '-inf';
    return String(value);
  }
  if (Array.isArray(value)) return `[${value.map(pyRepr).join(', ')}]`;
  if (typeof value === 'object' && value.constructor === Object) {
    return `{${Object.entries(value).map(([k, v]) => `'${k}': ${pyRepr(v)}`).join(', ')}}`;
  }
  return String(value);
}

/** Python's format(x, '.{precision}g'). */
export function formatG(x, precision = 6) {
  if (Number.isNaN(x)) return 'nan';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0' : '0';
  const [mant, expStr] = x.toExponential(precision - 1).split('e');
  const exp = Number(expStr);
  const trim = (s) => (s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s);
  if (exp < -4 || exp >= precision) {
    const e = Math.abs(exp) < 10 ? `0${Math.abs(exp)}` : String(Math.abs(exp));
    return `${trim(mant)}e${exp < 0 ? '-' : '+'}${e}`;
  }
  return trim(x.toFixed(Math.max(0, precision - 1 - exp)));
}
