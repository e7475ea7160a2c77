// Two talking heads sharing one TimarModel, as the Unity sample runs them: an "audio thread"
// accepts both heads' input in audio-callback-sized pieces (buffering only), the model's native
// worker runs their turns batched, and this (main) thread polls each head's motion. Then the
// model is disposed before the sessions, which still flush their trailing partial turn. Each
// head's motion is written as raw float32 for tests/test_native.py to compare with the Python
// Session of its seed.
//
//   mono TwoHeadsTest.exe BUNDLE UA.f32 AA.f32 UM.f32 SEED CHUNK OUT_A.f32 OUT_B.f32
//
// Head A: seed SEED, cfg 1, the user's face tracked (UM.f32). Head B: seed SEED+1, cfg 2, not tracked.
using System;
using System.IO;
using System.Threading;
using Timar;
using static TestSupport;

static class TwoHeadsTest
{
    sealed class Head
    {
        public TimarSession Session;
        public float[] UserMotion;   // null: not tracked
        public float[] Output;
        public int Frames, Turns;
    }

    static int Main(string[] args)
    {
        if (args.Length != 8)
        {
            Console.Error.WriteLine("usage: TwoHeadsTest.exe BUNDLE UA.f32 AA.f32 UM.f32 SEED CHUNK OUT_A.f32 OUT_B.f32");
            return 2;
        }
        float[] ua = ReadF32(args[1]), aa = ReadF32(args[2]), um = ReadF32(args[3]);
        ulong seed = ulong.Parse(args[4]);
        int chunk = int.Parse(args[5]);
        var modelOptions = TimarModelOptions.Default;
        modelOptions.Threads = 1;
        modelOptions.Backend = (int)TimarBackend.OnnxRuntimeCpu;
        var model = new TimarModel(args[0], modelOptions);
        int F = model.FramesPerTurn, S = model.SamplesPerTurn, D = TimarSession.MotionDim;
        int total = Math.Min(ua.Length, aa.Length), wholeTurns = total / S;
        var heads = new Head[2];
        for (int h = 0; h < 2; h++)
        {
            var options = TimarSessionOptions.Default;
            options.Seed = seed + (ulong)h;
            options.Cfg = h == 0 ? 1.0 : 2.0;
            heads[h] = new Head { Session = new TimarSession(model, options), UserMotion = h == 0 ? um : null,
                                  Output = new float[(wholeTurns + 1) * F * D] };
        }
        Check(heads[1].Session.Info.Cfg == 2.0 && heads[1].Session.Info.Seed == seed + 1, "session settings");
        Check(model.BackendName == "onnxruntime-cpu", "model backend " + model.BackendName);
        model.StartWorker();

        // The audio thread: both heads' pieces, interleaved, with the matching user motion frames.
        var audio = new Thread(() =>
        {
            int sentFrames = 0, motionFrames = um.Length / D;
            for (int pos = 0; pos < total; pos += chunk)
            {
                int n = Math.Min(chunk, total - pos);
                int wantFrames = (int)Math.Min((long)motionFrames, ((long)(pos + n) * F + S - 1) / S);
                int nm = wantFrames - sentFrames;
                heads[0].Session.Accept(ua, pos, n, um, sentFrames, nm, aa, pos, n);
                heads[1].Session.Accept(ua, pos, n, null, 0, 0, aa, pos, n);
                sentFrames += nm;
            }
        }) { Name = "audio" };
        audio.Start();

        // The main thread: poll until every whole turn of both heads arrived.
        var frame = new float[F * D];
        var deadline = DateTime.UtcNow.AddSeconds(300);
        while ((heads[0].Turns < wholeTurns || heads[1].Turns < wholeTurns) && DateTime.UtcNow < deadline)
        {
            bool any = false;
            foreach (var head in heads)
            {
                ulong turn;
                double start;
                int n = head.Session.PollMotion(frame, out turn, out start);
                if (n == 0) continue;
                any = true;
                Check(turn == (ulong)head.Turns && Math.Abs(start - head.Turns) < 1e-9,
                      "chunk of turn " + turn + " at " + start + " s, expected turn " + head.Turns);
                Array.Copy(frame, 0, head.Output, head.Frames * D, n * D);
                head.Frames += n;
                head.Turns++;
            }
            if (!any) Thread.Sleep(2);
        }
        audio.Join();
        Check(heads[0].Turns == wholeTurns && heads[1].Turns == wholeTurns,
              "turns polled: " + heads[0].Turns + ", " + heads[1].Turns + " of " + wholeTurns);

        // The model handle first: the sessions keep its graphs and finish their conversations.
        model.Dispose();
        foreach (var head in heads)
        {
            var tail = head.Session.Flush();
            Array.Copy(tail, 0, head.Output, head.Frames * D, tail.Length);
            head.Frames += tail.Length / D;
            head.Session.Dispose();
        }
        try
        {
            heads[0].Session.Accept(ua, null, aa);
            Check(false, "Accept after Dispose: no exception");
        }
        catch (ObjectDisposedException)
        {
            Check(true, "Accept after Dispose");
        }
        WriteF32(args[6], heads[0].Output, heads[0].Frames * D);
        WriteF32(args[7], heads[1].Output, heads[1].Frames * D);
        Console.WriteLine(heads[0].Frames + " and " + heads[1].Frames + " frames");
        return Summary();
    }
}
