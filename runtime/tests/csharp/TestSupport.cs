// What the C# test programs share: pass/fail counting and raw float32 files.
using System;
using System.IO;

static class TestSupport
{
    public static int Passed, Failed;

    public static void Check(bool ok, string what)
    {
        if (ok) Passed++;
        else { Failed++; Console.WriteLine("FAIL " + what); }
    }

    /// <summary>"N passed, M failed", and the exit status: 0 when nothing failed.</summary>
    public static int Summary()
    {
        Console.WriteLine(Passed + " passed, " + Failed + " failed");
        return Failed == 0 ? 0 : 1;
    }

    public static float[] ReadF32(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        var a = new float[bytes.Length / 4];
        Buffer.BlockCopy(bytes, 0, a, 0, a.Length * 4);
        return a;
    }

    public static void WriteF32(string path, float[] a, int floats)
    {
        var bytes = new byte[floats * 4];
        Buffer.BlockCopy(a, 0, bytes, 0, bytes.Length);
        File.WriteAllBytes(path, bytes);
    }
}
