// Drives the native library through the Unity bindings (runtime/unity/Runtime/*.cs) under Mono:
// a conversation fed in audio-callback-sized pieces, then flushed; the motion is written as raw
// float32 for tests/test_native.py to compare with the Python Session. Also checks that bad
// input raises TimarException with the library's message and leaves the session unchanged.
// SMOOTHING: "EXPRESSION,JAW,NECK" time constants in seconds (TimarSmoothing.Custom), or "-"
// for the bundle's default smoothing.
//
//   mono ConversationTest.exe BUNDLE UA.f32 AA.f32 UM.f32|- SEED CFG CHUNK OUT.f32 [SMOOTHING]
using System;
using System.IO;
using Timar;
using static TestSupport;

static class ConversationTest
{
    static void Expect(Action call, TimarStatus status, string needle, string what)
    {
        try
        {
            call();
            Check(false, what + ": no exception");
        }
        catch (TimarException e)
        {
            Check(e.Status == status, what + ": status " + e.Status + ", expected " + status);
            Check(e.Message.Contains(needle), what + ": message '" + e.Message + "' lacks '" + needle + "'");
        }
    }

    static int Main(string[] args)
    {
        if (args.Length != 8 && args.Length != 9)
        {
            Console.Error.WriteLine("usage: ConversationTest.exe BUNDLE UA.f32 AA.f32 UM.f32|- SEED CFG CHUNK OUT.f32 [SMOOTHING]");
            return 2;
        }
        float[] ua = ReadF32(args[1]), aa = ReadF32(args[2]);
        float[] um = args[3] == "-" ? null : ReadF32(args[3]);
        var options = TimarOptions.Default;
        options.Seed = ulong.Parse(args[4]);
        options.Cfg = double.Parse(args[5], System.Globalization.CultureInfo.InvariantCulture);
        options.Threads = 1;
        options.Backend = (int)TimarBackend.OnnxRuntimeCpu;
        int chunk = int.Parse(args[6]);
        double[] taus = null;
        if (args.Length == 9 && args[8] != "-")
        {
            taus = Array.ConvertAll(args[8].Split(','),
                                    t => double.Parse(t, System.Globalization.CultureInfo.InvariantCulture));
            options.Smoothing = (int)TimarSmoothing.Custom;
            options.SmoothingExpression = taus[0];
            options.SmoothingJaw = taus[1];
            options.SmoothingNeck = taus[2];
        }

        Console.WriteLine("timar " + TimarSession.Version + ": " + TimarSession.BuildInfo);
        Expect(() => new TimarSession("/nonexistent/bundle", options), TimarStatus.Bundle, "manifest.json", "no bundle");
        var tooSmooth = options;
        tooSmooth.Smoothing = (int)TimarSmoothing.Custom;
        tooSmooth.SmoothingNeck = 2.5;
        Expect(() => new TimarSession(args[0], tooSmooth), TimarStatus.InvalidArgument, "smoothing_neck",
               "smoothing 2.5 s");

        using (var session = new TimarSession(args[0], options))
        {
            int F = session.FramesPerTurn, S = session.SamplesPerTurn, D = TimarSession.MotionDim;
            Check(F == 25 && S == 16000 && session.Fps == 25 && session.SampleRate == 16000, "info");
            Check(session.BackendName == "onnxruntime-cpu", "backend " + session.BackendName);
            if (taus != null)
            {
                TimarInfo info = session.Info;
                Check(info.SmoothingExpression == taus[0] && info.SmoothingJaw == taus[1] && info.SmoothingNeck == taus[2],
                      "info reports the smoothing");
            }

            // Bad input first: every call fails and nothing changes.
            var turn = new float[S];
            Expect(() => session.Step(null, null, turn), TimarStatus.NullPointer, "user_audio", "null audio");
            Expect(() => session.Step(new float[S - 1], null, turn), TimarStatus.WrongLength, "user_audio", "short audio");
            Expect(() => session.Step(turn, new float[(F - 1) * D], turn), TimarStatus.WrongLength, "user_motion", "short motion");
            var nan = new float[S];
            nan[5] = float.NaN;
            Expect(() => session.Step(turn, null, nan), TimarStatus.NotFinite, "agent_audio", "NaN audio");
            Expect(() => session.Feed(nan, null, null), TimarStatus.NotFinite, "user_audio", "NaN feed");
            Expect(() => session.Step(turn, null, turn, new float[D]), TimarStatus.BufferTooSmall, "out_motion", "small output");
            Expect(() => session.SetState(new byte[16]), TimarStatus.State, "state", "bad state");
            var loud = new float[S];
            loud[7] = 1e20f;   // finite, but no microphone sends it: refused, not turned into NaN
            Expect(() => session.Step(loud, null, turn), TimarStatus.InvalidArgument, "TIMAR_AUDIO_LIMIT", "audio 1e20");
            var wild = new float[F * D];
            wild[3] = 25f;
            Expect(() => session.Step(turn, wild, turn), TimarStatus.InvalidArgument, "TIMAR_MOTION_LIMIT", "motion 25");
            Check((int)TimarStatus.Numeric == 12, "TimarStatus.Numeric is TIMAR_ERR_NUMERIC");
            Check(session.Info.Turns == 0, "no turn after bad calls");

            // The conversation, in audio-callback-sized pieces with the matching motion frames.
            int total = Math.Min(ua.Length, aa.Length), motionFrames = um == null ? 0 : um.Length / D;
            var output = new float[(total / S + 2) * F * D];
            int written = 0, sentFrames = 0;
            var state0 = session.GetState();
            for (int pos = 0; pos < total; pos += chunk)
            {
                int n = Math.Min(chunk, total - pos);
                int wantFrames = (int)Math.Min((long)motionFrames, ((long)(pos + n) * F + S - 1) / S);
                int nm = wantFrames - sentFrames;
                written += session.Feed(ua, pos, n, um, sentFrames, nm, aa, pos, n, output, written);
                sentFrames += nm;
            }
            var tail = session.Flush();
            Array.Copy(tail, 0, output, written * D, tail.Length);
            written += tail.Length / D;
            Console.WriteLine(written + " frames, " + session.Info.Turns + " turns");

            // Restoring the fresh state and stepping turn 0 gives the same first frames.
            session.SetState(state0);
            var first = session.Step(Slice(ua, 0, S), um == null ? null : Slice(um, 0, F * D), Slice(aa, 0, S));
            double diff = 0;
            for (int i = 0; i < first.Length; i++) diff = Math.Max(diff, Math.Abs(first[i] - output[i]));
            Check(diff < 1e-5, "state restore + step equals feed (max diff " + diff + ")");

            // Flush runs every buffered turn: two turns of audio whose motion lagged (half a turn).
            session.Reset();
            Check(session.Feed(Slice(ua, 0, 2 * S), new float[F / 2 * D], Slice(aa, 0, 2 * S)).Length == 0,
                  "feed with lagging motion completes no turn");
            Check(session.Flush().Length == 2 * F * D, "flush returns both buffered turns");

            WriteF32(args[7], output, written * D);
        }
        return Summary();
    }

    static float[] Slice(float[] a, int start, int n)
    {
        var s = new float[n];
        Array.Copy(a, start, s, 0, n);
        return s;
    }
}
