// P/Invoke declarations of the C ABI in runtime/include/timar.h (TIMAR_ABI_VERSION 1).
// C# 7, no UnityEngine dependency: compiles with Unity and with Mono's mcs (-unsafe).
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

    /// <summary>timar_options. Create with <see cref="TimarOptions.Default"/>, then change fields.
    /// temperature (0..10) / cfg (0..20): NaN takes the bundle's default; steps 0 likewise;
    /// threads 0 = the backend's default, else at most the CPUs available to the process.</summary>
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

    /// <summary>timar_info: what a session runs.</summary>
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
    }

    /// <summary>The raw C functions. Prefer <see cref="TimarSession"/>.</summary>
    public static unsafe class TimarNative
    {
#if (UNITY_IOS || UNITY_WEBGL) && !UNITY_EDITOR
        public const string Library = "__Internal";
#else
        public const string Library = "timar";   // libtimar.so / timar.dll / libtimar.dylib
#endif
        public const int AbiVersion = 1;
        public const int MotionDim = 56;
        /// <summary>TIMAR_AUDIO_LIMIT: the largest |sample| accepted (full scale is 1).</summary>
        public const float AudioLimit = 4.0f;
        /// <summary>TIMAR_MOTION_LIMIT: the largest |value| accepted in user motion.</summary>
        public const float MotionLimit = 20.0f;

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern int timar_abi_version();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_version();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_build_info();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_status_string(TimarStatus status);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_last_error();
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern void timar_options_init(ref TimarOptions options);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_session_create(byte[] bundleDirUtf8, ref TimarOptions options,
                                                              out IntPtr session);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern void timar_session_destroy(IntPtr session);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern TimarStatus timar_session_info(IntPtr session, ref TimarInfo info);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr timar_session_backend_name(IntPtr session);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)] public static extern TimarStatus timar_session_reset(IntPtr session);

        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_step(IntPtr session, float* userAudio, UIntPtr userAudioSamples,
                                                    float* userMotion, UIntPtr userMotionFrames,
                                                    float* agentAudio, UIntPtr agentAudioSamples,
                                                    float* outMotion, UIntPtr outCapacityFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_feed(IntPtr session, float* userAudio, UIntPtr userAudioSamples,
                                                    float* userMotion, UIntPtr userMotionFrames,
                                                    float* agentAudio, UIntPtr agentAudioSamples,
                                                    float* outMotion, UIntPtr outCapacityFrames,
                                                    out UIntPtr outFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_feed_frames(IntPtr session, UIntPtr userAudioSamples,
                                                           UIntPtr userMotionFrames, UIntPtr agentAudioSamples,
                                                           out UIntPtr outFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_flush(IntPtr session, float* outMotion, UIntPtr outCapacityFrames,
                                                     out UIntPtr outFrames);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_get_state(IntPtr session, byte* buffer, UIntPtr capacity,
                                                         out UIntPtr outSize);
        [DllImport(Library, CallingConvention = CallingConvention.Cdecl)]
        public static extern TimarStatus timar_set_state(IntPtr session, byte* buffer, UIntPtr size);
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
