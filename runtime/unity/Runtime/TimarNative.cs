// P/Invoke declarations of the C ABI in runtime/include/timar.h (TIMAR_ABI_VERSION 2).
// C# 7, no UnityEngine dependency: compiles with Unity and with Mono's mcs (-unsafe).
// Models and sessions are passed as SafeHandles: a call in progress keeps its handle open, so a
// Dispose on another thread (e.g. OnDestroy while the audio thread calls Accept) releases the
// native object only once that call has returned, and later calls throw ObjectDisposedException.
using System;
using System.Runtime.InteropServices;

namespace Timar
{
    /// <summary>timar_status: 0 is success.</summary>
    public enum TimarStatus
    {
        Ok = 0,
        NullPointer = 1,
        InvalidArgument = 2,
        WrongLength = 3,
        NotFinite = 4,
        BufferTooSmall = 5,
        Bundle = 6,
        Unsupported = 7,
        Backend = 8,
        State = 9,
        OutOfMemory = 10,
        Internal = 11,
        /// <summary>The model produced NaN or Inf; the turn was not committed, the session is unchanged.</summary>
        Numeric = 12,
    }

    public enum TimarBackend { Auto = 0, OnnxRuntimeCpu = 1, OnnxRuntimeCuda = 2, TensorRT = 3 }

    public enum TimarHistory { Default = 0, Masked = 1, Feedback = 2 }

    /// <summary>timar_smoothing: the output's causal smoothing, a one-pole low-pass filter per
    /// region (expression, jaw, neck) with a time constant in seconds, carried across turns.
    /// Default: the bundle's (its manifest's "smoothing"; none if it has none). Off: the exact
    /// model output. Custom: the options' SmoothingExpression / SmoothingJaw / SmoothingNeck
    /// (0..2 s; 0 = that region not smoothed). A region is delayed by about its time constant.</summary>
    public enum TimarSmoothing { Default = 0, Off = 1, Custom = 2 }

    /// <summary>timar_options. Create with <see cref="TimarOptions.Default"/>, then change fields.
    /// temperature (0..10) / cfg (0..20): NaN takes the bundle's default; steps 0 likewise;
    /// threads 0 = the backend's default, else at most the CPUs available to the process;
    /// Smoothing: a <see cref="TimarSmoothing"/>, and with Custom the three time constants in
    /// seconds (leave them 0 otherwise).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct TimarOptions
    {
        public uint StructSize;
        public uint Steps;
        public ulong Seed;
        public double Temperature;
        public double Cfg;
        public int History;
        public int Threads;
        public int ContextTurns;
        public int Backend;
        public int VerifyHashes;
        public int DeviceId;
        public int Smoothing;
        public double SmoothingExpression;
        public double SmoothingJaw;
        public double SmoothingNeck;

        public static TimarOptions Default
        {
            get
            {
                var o = new TimarOptions();
                TimarNative.timar_options_init(ref o);
                return o;
            }
        }
    }

    /// <summary>timar_model_options: what loads the graphs, shared by the model's sessions. Create
    /// with <see cref="TimarModelOptions.Default"/>. Spin: ONNX Runtime's threads spin between
    /// operators (faster on an idle machine, much slower beside other busy processes); 0 = sleep.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct TimarModelOptions
    {
        public uint StructSize;
        public int Backend;
        public int Threads;
        public int DeviceId;
        public int VerifyHashes;
        public int Spin;

        public static TimarModelOptions Default
        {
            get
            {
                var o = new TimarModelOptions();
                TimarNative.timar_model_options_init(ref o);
                return o;
            }
        }
    }

    /// <summary>timar_session_options: one conversation's settings on a shared model. Create with
    /// <see cref="TimarSessionOptions.Default"/> (NaN / 0 = the bundle's defaults). Smoothing as in
    /// <see cref="TimarOptions"/>.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct TimarSessionOptions
    {
        public uint StructSize;
        public uint Steps;
        public ulong Seed;
        public double Temperature;
        public double Cfg;
        public int History;
        public int ContextTurns;
        public int Smoothing;
        public double SmoothingExpression;
        public double SmoothingJaw;
        public double SmoothingNeck;

        public static TimarSessionOptions Default
        {
            get
            {
                var o = new TimarSessionOptions();
                TimarNative.timar_session_options_init(ref o);
                return o;
            }
        }
    }

    /// <summary>A native object owned from C#: released by Dispose or, as a last resort, the finalizer.</summary>
    public abstract class TimarHandle : SafeHandle
    {
        protected TimarHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
    }

    /// <summary>Owns a timar_model*. The model's graphs live on while sessions of it do.</summary>
    public sealed class TimarModelHandle : TimarHandle
    {
        protected override bool ReleaseHandle()
        {
            TimarNative.timar_model_destroy(handle);
            return true;
        }
    }

    /// <summary>Owns a timar_session*.</summary>
    public sealed class TimarSessionHandle : TimarHandle
    {
        protected override bool ReleaseHandle()
        {
            TimarNative.timar_session_destroy(handle);
            return true;
        }
    }

    /// <summary>timar_info: what a session runs. Smoothing*: the output smoothing in effect,
    /// seconds per region (0 = not smoothed).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct TimarInfo
    {
        public uint StructSize;
        public int Fps;
        public int SampleRate;
        public int FramesPerTurn;
        public int SamplesPerTurn;
        public int MotionDim;
        public int ContextTurns;
        public int Steps;
        public int History;
        public int Backend;
        public double Temperature;
        public double Cfg;
        public ulong Seed;
        public ulong Turns;
        public int ExpBegin, ExpEnd;
        public int JawBegin, JawEnd;
        public int NeckBegin, NeckEnd;
        public double SmoothingExpression;
        public double SmoothingJaw;
        public double SmoothingNeck;
    }

    /// <summary>The raw C functions. Prefer <see cref="TimarSession"/>.</summary>
    public static unsafe class TimarNative
    {
#if (UNITY_IOS || UNITY_WEBGL) && !UNITY_EDITOR
        public const string Library = "__Internal";
#else
        public const string Library = "timar";   // libtimar.so / timar.dll / libtimar.dylib
#endif
        public const int AbiVersion = 2;
        public const int MotionDim = 56;
        /// <summary>TIMAR_AUDIO_LIMIT: the largest |sample| accepted (full scale is 1).</summary>
        public const float AudioLimit = 4.0f;
        /// <summary>TIMAR_MOTION_LIMIT: the largest |value| accepted in user motion.</summary>
        public const float MotionLimit = 20.0f;
        /// <summary>TIMAR_SMOOTHING_MAX_SECONDS: the longest smoothing time constant accepted.</summary>
        public const double SmoothingMaxSeconds = 2.0;

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern int timar_abi_version();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_version();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_build_info();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_status_string(TimarStatus status);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_last_error();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern void timar_options_init(ref TimarOptions options);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern void timar_model_options_init(ref TimarModelOptions options);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern void timar_session_options_init(ref TimarSessionOptions options);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_model_create(byte[] bundleDirUtf8, ref TimarModelOptions options,
                                                            out TimarModelHandle model);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern void timar_model_destroy(IntPtr model);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern TimarStatus timar_model_info(TimarModelHandle model, ref TimarInfo info);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_model_backend_name(TimarModelHandle model);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_model_run_ready(TimarModelHandle model, UIntPtr maxBatch, out UIntPtr turns,
                                                               out UIntPtr batches);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern TimarStatus timar_model_start_worker(TimarModelHandle model, UIntPtr maxBatch);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern TimarStatus timar_model_stop_worker(TimarModelHandle model);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_session_create_from_model(TimarModelHandle model, ref TimarSessionOptions options,
                                                                         out TimarSessionHandle session);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_session_create(byte[] bundleDirUtf8, ref TimarOptions options,
                                                              out TimarSessionHandle session);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern void timar_session_destroy(IntPtr session);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern TimarStatus timar_session_info(TimarSessionHandle session, ref TimarInfo info);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_session_backend_name(TimarSessionHandle session);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern TimarStatus timar_session_reset(TimarSessionHandle session);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_step(TimarSessionHandle session, float* userAudio, UIntPtr userAudioSamples,
                                                    float* userMotion, UIntPtr userMotionFrames,
                                                    float* agentAudio, UIntPtr agentAudioSamples,
                                                    float* outMotion, UIntPtr outCapacityFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_feed(TimarSessionHandle session, float* userAudio, UIntPtr userAudioSamples,
                                                    float* userMotion, UIntPtr userMotionFrames,
                                                    float* agentAudio, UIntPtr agentAudioSamples,
                                                    float* outMotion, UIntPtr outCapacityFrames,
                                                    out UIntPtr outFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_feed_frames(TimarSessionHandle session, UIntPtr userAudioSamples,
                                                           UIntPtr userMotionFrames, UIntPtr agentAudioSamples,
                                                           out UIntPtr outFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_flush(TimarSessionHandle session, float* outMotion, UIntPtr outCapacityFrames,
                                                     out UIntPtr outFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_get_state(TimarSessionHandle session, byte* buffer, UIntPtr capacity,
                                                         out UIntPtr outSize);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_set_state(TimarSessionHandle session, byte* buffer, UIntPtr size);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_session_accept(TimarSessionHandle session, float* userAudio, UIntPtr userAudioSamples,
                                                              float* userMotion, UIntPtr userMotionFrames,
                                                              float* agentAudio, UIntPtr agentAudioSamples,
                                                              out UIntPtr readyTurns);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_session_poll_motion(TimarSessionHandle session, float* outMotion,
                                                                   UIntPtr outCapacityFrames, out UIntPtr outFrames,
                                                                   out ulong turn, out double startSeconds);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_pcm16_to_float(short* pcm, UIntPtr samples, float* outSamples);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_philox_normals(ulong seed, ulong counterLo, ulong counterHi,
                                                              float* outNormals, UIntPtr n);

        /// <summary>A NUL-terminated UTF-8 string owned by the library.</summary>
        public static string Utf8(IntPtr p)
        {
            if (p == IntPtr.Zero) return "";
            int n = 0;
            byte* b = (byte*)p;
            while (b[n] != 0) n++;
            return System.Text.Encoding.UTF8.GetString(b, n);
        }
    }
}
