// A managed TIMAR model: a bundle's graphs loaded once and shared by any number of
// TimarSessions (one per head / conversation). Its worker thread runs the sessions' accepted
// turns batched, so neither Unity's main thread nor the audio thread runs inference.
using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Timar
{
    public sealed class TimarModel : IDisposable
    {
        readonly TimarModelHandle _handle;
        readonly TimarInfo _static;

        /// <summary>Open a bundle folder and load its graphs. Throws TimarException (Status Bundle
        /// for a missing or modified bundle, InvalidArgument for bad options).</summary>
        public TimarModel(string bundleDir, TimarModelOptions options)
        {
            if (bundleDir == null) throw new ArgumentNullException("bundleDir");
            TimarException.CheckAbi();
            byte[] path = Encoding.UTF8.GetBytes(bundleDir + "\0");
            TimarModelHandle handle;
            TimarException.Check(TimarNative.timar_model_create(path, ref options, out handle));
            _handle = handle;
            _static = Info;
        }

        public TimarModel(string bundleDir) : this(bundleDir, TimarModelOptions.Default) { }

        /// <summary>The bundle's facts and default settings (seed 0, turns 0, its default smoothing).</summary>
        public TimarInfo Info
        {
            get
            {
                var info = new TimarInfo { StructSize = (uint)Marshal.SizeOf(typeof(TimarInfo)) };
                TimarException.Check(TimarNative.timar_model_info(Handle, ref info));
                return info;
            }
        }

        public int FramesPerTurn { get { return _static.FramesPerTurn; } }
        public int SamplesPerTurn { get { return _static.SamplesPerTurn; } }
        public int SampleRate { get { return _static.SampleRate; } }
        public int Fps { get { return _static.Fps; } }
        public string BackendName { get { return TimarNative.Utf8(TimarNative.timar_model_backend_name(Handle)); } }

        /// <summary>On the calling thread: one whole accepted turn of every session that has one,
        /// batched (at most maxBatch sessions a batch; 0 = all). Returns the turns run; call
        /// again while it returns more than 0. Each turn's motion goes to its session's
        /// PollMotion.</summary>
        public int RunReady(int maxBatch = 0)
        {
            if (maxBatch < 0) throw new ArgumentOutOfRangeException("maxBatch");
            UIntPtr turns, batches;
            TimarException.Check(TimarNative.timar_model_run_ready(Handle, (UIntPtr)(uint)maxBatch, out turns, out batches));
            return (int)turns;
        }

        /// <summary>Start the model's worker thread: it runs the sessions' turns as they become
        /// ready (at most maxBatch sessions a batch; 0 = all).</summary>
        public void StartWorker(int maxBatch = 0)
        {
            if (maxBatch < 0) throw new ArgumentOutOfRangeException("maxBatch");
            TimarException.Check(TimarNative.timar_model_start_worker(Handle, (UIntPtr)(uint)maxBatch));
        }

        /// <summary>Stop the worker after its current batch (turns still buffered stay buffered).</summary>
        public void StopWorker() { TimarException.Check(TimarNative.timar_model_stop_worker(Handle)); }

        /// <summary>Stops the worker and releases this handle; sessions of the model keep its
        /// graphs until they are disposed too.</summary>
        public void Dispose() { _handle.Dispose(); }

        internal TimarModelHandle Handle
        {
            get
            {
                if (_handle.IsClosed) throw new ObjectDisposedException("TimarModel");
                return _handle;
            }
        }
    }
}
