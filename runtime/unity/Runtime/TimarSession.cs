// A managed TIMAR session: owns the native handle, checks arguments, turns error codes into
// TimarException (with the library's message). Threads: Accept and PollMotion may be called from
// any thread (the audio thread, the main thread) while the session's turns run in its model's
// batches; the other calls lock the session natively, and Step/Feed/Flush run inference on the
// calling thread, so keep those off the main and audio threads.
using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Timar
{
    public sealed class TimarException : Exception
    {
        public TimarStatus Status { get; }

        public TimarException(TimarStatus status, string message) : base(message) { Status = status; }

        /// <summary>Throws the library's error for a failed status (the message names the argument).</summary>
        public static void Check(TimarStatus status)
        {
            if (status == TimarStatus.Ok) return;
            string message = TimarNative.Utf8(TimarNative.timar_last_error());
            throw new TimarException(status, status + ": " + message);
        }

        /// <summary>Refuses a native library of another ABI than these bindings'.</summary>
        public static void CheckAbi()
        {
            int abi = TimarNative.timar_abi_version();
            if (abi != TimarNative.AbiVersion)
                throw new TimarException(TimarStatus.Unsupported,
                    "native timar library has ABI " + abi + ", these bindings need " + TimarNative.AbiVersion);
        }
    }

    /// <summary>
    /// Streams a conversation through a TIMAR bundle: a session of a shared <see cref="TimarModel"/>
    /// (buffered streaming: <see cref="Accept(float[], float[], float[])"/>, the model's worker,
    /// <see cref="PollMotion"/>), or one with a private model (bundle path constructor). Audio: mono float samples in [-1, 1] at
    /// <see cref="SampleRate"/> (16 kHz); |x| above <see cref="TimarNative.AudioLimit"/> (4) is
    /// refused. Motion: frames of 56 floats (FLAME expression 0..49, jaw 50..52, neck 53..55,
    /// axis-angle radians), row-major in float arrays, |x| at most <see cref="TimarNative.MotionLimit"/>.
    /// A turn whose output would hold NaN/Inf raises TimarException with Status Numeric and
    /// changes nothing. The options' Smoothing (<see cref="TimarSmoothing"/>) filters the motion
    /// causally across turns; <see cref="Info"/> reports the time constants in effect.
    /// </summary>
    public sealed unsafe class TimarSession : IDisposable
    {
        public const int MotionDim = TimarNative.MotionDim;

        readonly TimarSessionHandle _handle;
        readonly TimarInfo _static;

        /// <summary>A session with a private model: open a bundle folder. Throws TimarException
        /// (Status Bundle for a missing or modified bundle, InvalidArgument for bad options).</summary>
        public TimarSession(string bundleDir, TimarOptions options)
        {
            if (bundleDir == null) throw new ArgumentNullException("bundleDir");
            TimarException.CheckAbi();
            byte[] path = Encoding.UTF8.GetBytes(bundleDir + "\0");
            TimarSessionHandle handle;
            Check(TimarNative.timar_session_create(path, ref options, out handle));
            _handle = handle;
            _static = Info;
        }

        /// <summary>One conversation on a shared model (its graphs stay loaded while the session
        /// lives, even after the model is disposed). Throws TimarException (InvalidArgument for
        /// bad options).</summary>
        public TimarSession(TimarModel model, TimarSessionOptions options)
        {
            if (model == null) throw new ArgumentNullException("model");
            TimarSessionHandle handle;
            Check(TimarNative.timar_session_create_from_model(model.Handle, ref options, out handle));
            _handle = handle;
            _static = Info;
        }

        public TimarSession(TimarModel model) : this(model, TimarSessionOptions.Default) { }

        public TimarSession(string bundleDir) : this(bundleDir, TimarOptions.Default) { }

        public static string Version { get { return TimarNative.Utf8(TimarNative.timar_version()); } }
        public static string BuildInfo { get { return TimarNative.Utf8(TimarNative.timar_build_info()); } }

        public TimarInfo Info
        {
            get
            {
                var info = new TimarInfo { StructSize = (uint)Marshal.SizeOf(typeof(TimarInfo)) };
                Check(TimarNative.timar_session_info(Handle, ref info));
                return info;
            }
        }

        public int FramesPerTurn { get { return _static.FramesPerTurn; } }
        public int SamplesPerTurn { get { return _static.SamplesPerTurn; } }
        public int SampleRate { get { return _static.SampleRate; } }
        public int Fps { get { return _static.Fps; } }
        public string BackendName { get { return TimarNative.Utf8(TimarNative.timar_session_backend_name(Handle)); } }

        /// <summary>Back to a fresh session: empty cache and buffers, generator at its seed.</summary>
        public void Reset() { Check(TimarNative.timar_session_reset(Handle)); }

        /// <summary>Exactly one turn: SamplesPerTurn samples of each audio; userMotion null (face
        /// not tracked) or FramesPerTurn * 56 floats. Returns FramesPerTurn * 56 floats.</summary>
        public float[] Step(float[] userAudio, float[] userMotion, float[] agentAudio)
        {
            var output = new float[FramesPerTurn * MotionDim];
            Step(userAudio, userMotion, agentAudio, output);
            return output;
        }

        public void Step(float[] userAudio, float[] userMotion, float[] agentAudio, float[] output)
        {
            if (output == null) throw new ArgumentNullException("output");
            int motionFrames = userMotion == null ? 0 : FramesOf(userMotion.Length, "userMotion");
            fixed (float* ua = userAudio)
            fixed (float* um = userMotion)
            fixed (float* aa = agentAudio)
            fixed (float* o = output)
            {
                Check(TimarNative.timar_step(Handle, ua, Len(userAudio), um, (UIntPtr)(uint)motionFrames, aa,
                                             Len(agentAudio), o, (UIntPtr)(uint)(output.Length / MotionDim)));
            }
        }

        /// <summary>How many frames Feed would return for pieces of these lengths.</summary>
        public int FeedFrames(int userAudioSamples, int userMotionFrames, int agentAudioSamples)
        {
            UIntPtr frames;
            Check(TimarNative.timar_feed_frames(Handle, (UIntPtr)(uint)userAudioSamples, (UIntPtr)(uint)userMotionFrames,
                                                (UIntPtr)(uint)agentAudioSamples, out frames));
            return (int)frames;
        }

        /// <summary>Streaming: pieces of any length (count 0 = nothing); returns the number of
        /// frames written to output (whole turns completed by this call). Never feed motion for
        /// an untracked user. output must hold FeedFrames(...) * 56 floats.</summary>
        public int Feed(float[] userAudio, int userAudioOffset, int userAudioCount,
                        float[] userMotion, int userMotionOffsetFrames, int userMotionFrames,
                        float[] agentAudio, int agentAudioOffset, int agentAudioCount,
                        float[] output, int outputOffsetFrames = 0)
        {
            CheckRange(userAudio, userAudioOffset, userAudioCount, 1, "userAudio");
            CheckRange(agentAudio, agentAudioOffset, agentAudioCount, 1, "agentAudio");
            CheckRange(userMotion, userMotionOffsetFrames, userMotionFrames, MotionDim, "userMotion");
            if (output == null) throw new ArgumentNullException("output");
            int capacity = output.Length / MotionDim - outputOffsetFrames;
            if (outputOffsetFrames < 0 || capacity < 0) throw new ArgumentOutOfRangeException("outputOffsetFrames");
            UIntPtr frames;
            fixed (float* ua = userAudio)
            fixed (float* um = userMotion)
            fixed (float* aa = agentAudio)
            fixed (float* o = output)
            {
                Check(TimarNative.timar_feed(Handle,
                    userAudioCount > 0 ? ua + userAudioOffset : null, (UIntPtr)(uint)userAudioCount,
                    userMotionFrames > 0 ? um + (long)userMotionOffsetFrames * MotionDim : null, (UIntPtr)(uint)userMotionFrames,
                    agentAudioCount > 0 ? aa + agentAudioOffset : null, (UIntPtr)(uint)agentAudioCount,
                    capacity > 0 ? o + (long)outputOffsetFrames * MotionDim : null, (UIntPtr)(uint)capacity, out frames));
            }
            return (int)frames;
        }

        /// <summary>Buffered streaming: check and buffer pieces (count 0 = nothing) without running
        /// anything, e.g. from the audio thread; the model's worker (or RunReady) runs whole
        /// turns batched and PollMotion hands out their motion. Returns the whole turns buffered
        /// and not yet run. Bad input throws TimarException and buffers nothing.</summary>
        public int Accept(float[] userAudio, int userAudioOffset, int userAudioCount,
                          float[] userMotion, int userMotionOffsetFrames, int userMotionFrames,
                          float[] agentAudio, int agentAudioOffset, int agentAudioCount)
        {
            CheckRange(userAudio, userAudioOffset, userAudioCount, 1, "userAudio");
            CheckRange(agentAudio, agentAudioOffset, agentAudioCount, 1, "agentAudio");
            CheckRange(userMotion, userMotionOffsetFrames, userMotionFrames, MotionDim, "userMotion");
            UIntPtr ready;
            fixed (float* ua = userAudio)
            fixed (float* um = userMotion)
            fixed (float* aa = agentAudio)
            {
                Check(TimarNative.timar_session_accept(Handle,
                    userAudioCount > 0 ? ua + userAudioOffset : null, (UIntPtr)(uint)userAudioCount,
                    userMotionFrames > 0 ? um + (long)userMotionOffsetFrames * MotionDim : null, (UIntPtr)(uint)userMotionFrames,
                    agentAudioCount > 0 ? aa + agentAudioOffset : null, (UIntPtr)(uint)agentAudioCount, out ready));
            }
            return (int)ready;
        }

        /// <summary>Accept whole arrays (any may be null: nothing of that stream).</summary>
        public int Accept(float[] userAudio, float[] userMotion, float[] agentAudio)
        {
            int um = userMotion == null ? 0 : FramesOf(userMotion.Length, "userMotion");
            return Accept(userAudio, 0, userAudio == null ? 0 : userAudio.Length, userMotion, 0, um,
                          agentAudio, 0, agentAudio == null ? 0 : agentAudio.Length);
        }

        /// <summary>The oldest turn run from accepted input and not yet polled: its FramesPerTurn
        /// frames into output (FramesPerTurn * 56 floats), its index in the conversation and the
        /// media time of its first frame (seconds since the start). Returns 0 when none is
        /// queued. A turn that failed in its batch throws TimarException once (Status Numeric,
        /// Backend, ...); its input was dropped and the conversation goes on from before it.</summary>
        public int PollMotion(float[] output, out ulong turn, out double startSeconds)
        {
            if (output == null) throw new ArgumentNullException("output");
            UIntPtr frames;
            fixed (float* o = output)
            {
                Check(TimarNative.timar_session_poll_motion(Handle, o, (UIntPtr)(uint)(output.Length / MotionDim), out frames,
                                                            out turn, out startSeconds));
            }
            return (int)frames;
        }

        /// <summary>Convenience: whole arrays (any may be null); returns the completed frames
        /// (k * FramesPerTurn * 56 floats, possibly empty).</summary>
        public float[] Feed(float[] userAudio, float[] userMotion, float[] agentAudio)
        {
            int ua = userAudio == null ? 0 : userAudio.Length, aa = agentAudio == null ? 0 : agentAudio.Length;
            int um = userMotion == null ? 0 : FramesOf(userMotion.Length, "userMotion");
            var output = new float[FeedFrames(ua, um, aa) * MotionDim];
            int n = Feed(userAudio, 0, ua, userMotion, 0, um, agentAudio, 0, aa, output);
            if (n * MotionDim != output.Length) Array.Resize(ref output, n * MotionDim);
            return output;
        }

        /// <summary>Finish the stream: runs every buffered turn (the last one padded) and returns
        /// the frames the real audio covers, written to output. FramesPerTurn * 56 floats are
        /// enough unless user motion lagged behind the audio; if output is too small nothing is
        /// consumed and TimarException (Status BufferTooSmall) says how many frames it needs.</summary>
        public int Flush(float[] output)
        {
            if (output == null) throw new ArgumentNullException("output");
            UIntPtr frames;
            fixed (float* o = output)
            {
                Check(TimarNative.timar_flush(Handle, o, (UIntPtr)(uint)(output.Length / MotionDim), out frames));
            }
            return (int)frames;
        }

        /// <summary>Flush into a new array of the right size (possibly empty).</summary>
        public float[] Flush()
        {
            var output = new float[FramesPerTurn * MotionDim];
            UIntPtr frames;
            TimarStatus status;
            fixed (float* o = output)
            {
                status = TimarNative.timar_flush(Handle, o, (UIntPtr)(uint)FramesPerTurn, out frames);
            }
            if (status == TimarStatus.BufferTooSmall)   // several buffered turns: frames says how many
            {
                output = new float[checked((int)frames * MotionDim)];
                return output.Length == 0 ? output : FlushInto(output);
            }
            Check(status);
            Array.Resize(ref output, (int)frames * MotionDim);
            return output;
        }

        float[] FlushInto(float[] output)
        {
            int n = Flush(output);
            Array.Resize(ref output, n * MotionDim);
            return output;
        }

        /// <summary>Snapshot (cache, ring, generator, buffers) as an opaque blob.</summary>
        public byte[] GetState()
        {
            UIntPtr size;
            Check(TimarNative.timar_get_state(Handle, null, UIntPtr.Zero, out size));
            var blob = new byte[(long)size];
            fixed (byte* b = blob)
            {
                Check(TimarNative.timar_get_state(Handle, b, size, out size));
            }
            return blob;
        }

        public void SetState(byte[] blob)
        {
            if (blob == null) throw new ArgumentNullException("blob");
            fixed (byte* b = blob)
            {
                Check(TimarNative.timar_set_state(Handle, b, (UIntPtr)(uint)blob.Length));
            }
        }

        /// <summary>16-bit PCM to float in [-1, 1), as the runtime expects.</summary>
        public static float[] Pcm16ToFloat(short[] pcm)
        {
            var output = new float[pcm.Length];
            fixed (short* p = pcm)
            fixed (float* o = output)
            {
                Check(TimarNative.timar_pcm16_to_float(p, (UIntPtr)(uint)pcm.Length, o));
            }
            return output;
        }

        public void Dispose()
        {
            _handle.Dispose();
        }

        // ---- helpers ---------------------------------------------------------------------
        TimarSessionHandle Handle
        {
            get
            {
                if (_handle.IsClosed) throw new ObjectDisposedException("TimarSession");
                return _handle;
            }
        }

        static void Check(TimarStatus status) { TimarException.Check(status); }

        static UIntPtr Len(float[] a) { return (UIntPtr)(uint)(a == null ? 0 : a.Length); }

        static int FramesOf(int floats, string name)
        {
            if (floats % MotionDim != 0)
                throw new ArgumentException(name + ": length " + floats + " is not a multiple of " + MotionDim, name);
            return floats / MotionDim;
        }

        static void CheckRange(float[] a, int offset, int count, int stride, string name)
        {
            if (count < 0 || offset < 0) throw new ArgumentOutOfRangeException(name);
            if (count == 0) return;
            if (a == null) throw new ArgumentNullException(name);
            if (((long)offset + count) * stride > a.Length)
                throw new ArgumentOutOfRangeException(name, name + ": offset + count beyond the array");
        }
    }
}
