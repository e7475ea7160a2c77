// Sample: drive an avatar's head with TIMAR in a live conversation.
//
// Put this on the GameObject that has the agent's AudioSource (its voice: TTS or a recording).
// The user's voice comes from a microphone (or a second AudioSource). Samples are gathered on
// the audio thread / in Update, fed to a TimarSession on one worker thread (a session is used
// from one thread only), and the motion frames it returns are applied at 25 fps in LateUpdate:
// jaw pose -> jaw bone, neck pose -> head/neck bone, expression -> blendshapes.
//
// Motion for a turn is available once the whole turn's audio has arrived (turn_seconds = 1 s)
// plus compute time, so playback runs `playbackDelaySeconds` behind the audio. To lip-sync the
// agent, delay the agent's audible output by the same amount (e.g. route the AudioSource through
// a delay, or feed TIMAR the TTS audio ahead of playing it).
using System;
using System.Collections.Generic;
using System.IO;
using System.Threading;
using Timar;
using UnityEngine;

[RequireComponent(typeof(AudioSource))]
public class TimarTalkingHead : MonoBehaviour
{
    [Header("Bundle (folder under StreamingAssets)")]
    public string bundleFolder = "timar_bundle";
    public ulong seed = 0;
    [Tooltip("Classifier-free guidance; 1 = off (half the compute).")]
    public float cfg = 1f;

    [Header("User audio")]
    public bool useMicrophone = true;
    [Tooltip("Microphone device name; empty = default.")]
    public string microphoneDevice = "";
    [Tooltip("Instead of a microphone: an AudioSource playing the user's voice (its clip is read).")]
    public AudioSource userSource;

    [Header("Rig")]
    public Transform jawBone;
    public Transform headBone;
    [Tooltip("Scales the jaw/neck rotations (1 = FLAME's radians as they are).")]
    public float poseScale = 1f;
    public SkinnedMeshRenderer face;
    [Tooltip("Expression -> blendshape mapping; see the package README (FLAME or ARKit heads).")]
    public BlendshapeMapping[] blendshapes = new BlendshapeMapping[0];
    [Tooltip("Clamp weights to 0..100 (ARKit-style shapes). Off for FLAME expression shapes, whose "
             + "coefficients are signed (needs Unity's blendshape clamping disabled, the default).")]
    public bool clampWeights = true;
    public float playbackDelaySeconds = 1.2f;

    [Serializable]
    public struct BlendshapeMapping
    {
        [Tooltip("Index in the 56-float motion frame: expression 0..49.")] public int motionIndex;
        [Tooltip("Blendshape index on the face mesh.")] public int blendshapeIndex;
        [Tooltip("Weight = offset + scale * value (clamped to 0..100 when clampWeights).")] public float scale;
        public float offset;
    }

    string MicDevice => string.IsNullOrEmpty(microphoneDevice) ? null : microphoneDevice;

    TimarSession _session;
    Thread _worker;
    volatile bool _running;
    readonly object _lock = new object();
    readonly List<float> _userIn = new List<float>(), _agentIn = new List<float>();
    readonly Queue<float[]> _frames = new Queue<float[]>();
    Quaternion _jawRest, _headRest;
    AudioClip _mic;
    int _micPos;
    int _outputRate;
    double _resampleAgent, _resampleUser;
    double _startTime = -1;
    long _framesPlayed;
    float[] _current;

    void Start()
    {
        _outputRate = AudioSettings.outputSampleRate;
        var options = TimarOptions.Default;
        options.Seed = seed;
        options.Cfg = cfg;
        string path = Path.Combine(Application.streamingAssetsPath, bundleFolder);
        try
        {
            _session = new TimarSession(path, options);
        }
        catch (Exception e)   // TimarException (bad bundle) or DllNotFoundException (no native library)
        {
            Debug.LogError("TIMAR: " + e.Message);
            enabled = false;
            return;
        }
        Debug.Log("TIMAR " + TimarSession.Version + " on " + _session.BackendName);
        if (jawBone) _jawRest = jawBone.localRotation;
        if (headBone) _headRest = headBone.localRotation;
        if (useMicrophone && userSource == null)
        {
            _mic = Microphone.Start(MicDevice, true, 2,
                                    _session.SampleRate);
        }
        _running = true;
        _worker = new Thread(Worker) { IsBackground = true, Name = "TIMAR" };
        _worker.Start();
    }

    // Agent voice, on the audio thread: downmix, resample to 16 kHz, queue.
    void OnAudioFilterRead(float[] data, int channels)
    {
        if (!_running) return;
        lock (_lock) Resample(data, channels, _outputRate, _agentIn, ref _resampleAgent);
    }

    void Update()
    {
        if (_mic != null)
        {
            int pos = Microphone.GetPosition(MicDevice);
            int n = (pos - _micPos + _mic.samples) % _mic.samples;
            if (n > 0)
            {
                var buf = new float[n * _mic.channels];
                _mic.GetData(buf, _micPos);   // wraps around the looping clip
                lock (_lock) Resample(buf, _mic.channels, _mic.frequency, _userIn, ref _resampleUser);
                _micPos = pos;
            }
        }
        else if (userSource != null && userSource.isPlaying && userSource.clip != null)
        {
            // read what the user source played since the last frame
            int pos = userSource.timeSamples, clip = userSource.clip.samples;
            int n = (pos - _micPos + clip) % clip;
            if (n > 0)
            {
                var buf = new float[n * userSource.clip.channels];
                userSource.clip.GetData(buf, _micPos);
                lock (_lock) Resample(buf, userSource.clip.channels, userSource.clip.frequency, _userIn, ref _resampleUser);
                _micPos = pos;
            }
        }
    }

    // Linear resampling to the bundle's rate; `phase` carries the fractional position.
    void Resample(float[] data, int channels, int rate, List<float> into, ref double phase)
    {
        int frames = data.Length / channels;
        double step = (double)rate / _session.SampleRate;
        for (; phase < frames - 1; phase += step)
        {
            int i = (int)phase;
            double frac = phase - i;
            float a = 0, b = 0;
            for (int c = 0; c < channels; c++) { a += data[i * channels + c]; b += data[(i + 1) * channels + c]; }
            into.Add((float)((a + (b - a) * frac) / channels));
        }
        phase -= frames;
        if (phase < 0) phase = 0;
    }

    void Worker()
    {
        int F = _session.FramesPerTurn;
        var output = new float[F * TimarSession.MotionDim * 4];
        while (_running)
        {
            float[] user, agent;
            lock (_lock)
            {
                int n = Math.Min(_userIn.Count, _agentIn.Count);   // keep the two streams aligned
                if (useMicrophone == false && userSource == null) n = _agentIn.Count;
                user = _userIn.GetRange(0, Math.Min(n, _userIn.Count)).ToArray();
                agent = _agentIn.GetRange(0, n).ToArray();
                _userIn.RemoveRange(0, user.Length);
                _agentIn.RemoveRange(0, n);
            }
            if (agent.Length == 0) { Thread.Sleep(10); continue; }
            if (user.Length < agent.Length) Array.Resize(ref user, agent.Length);   // silence for a missing user
            try
            {
                int frames = _session.Feed(user, 0, user.Length, null, 0, 0, agent, 0, agent.Length, output);
                lock (_frames)
                    for (int f = 0; f < frames; f++)
                    {
                        var frame = new float[TimarSession.MotionDim];
                        Array.Copy(output, f * TimarSession.MotionDim, frame, 0, frame.Length);
                        _frames.Enqueue(frame);
                    }
            }
            catch (TimarException e)
            {
                Debug.LogWarning("TIMAR: " + e.Message);
            }
        }
    }

    void LateUpdate()
    {
        lock (_frames)
        {
            if (_startTime < 0 && _frames.Count > 0) _startTime = Time.timeAsDouble;
            if (_startTime < 0) return;
            long due = (long)((Time.timeAsDouble - _startTime) * _session.Fps);
            while (_framesPlayed <= due && _frames.Count > 0) { _current = _frames.Dequeue(); _framesPlayed++; }
        }
        if (_current != null) Apply(_current);
    }

    // FLAME axis-angle (right-handed, y up, z toward the viewer) -> Unity (left-handed): mirror x.
    static Quaternion AxisAngle(float x, float y, float z, float scale)
    {
        var v = new Vector3(x, -y, -z) * scale;
        float angle = v.magnitude;
        return angle < 1e-8f ? Quaternion.identity : Quaternion.AngleAxis(angle * Mathf.Rad2Deg, v / angle);
    }

    void Apply(float[] m)
    {
        if (jawBone) jawBone.localRotation = _jawRest * AxisAngle(m[50], m[51], m[52], poseScale);
        if (headBone) headBone.localRotation = _headRest * AxisAngle(m[53], m[54], m[55], poseScale);
        if (face)
            foreach (var b in blendshapes)
            {
                float w = b.offset + b.scale * m[b.motionIndex];
                face.SetBlendShapeWeight(b.blendshapeIndex, clampWeights ? Mathf.Clamp(w, 0f, 100f) : w);
            }
    }

    void OnDestroy()
    {
        _running = false;
        if (_worker != null) _worker.Join();
        if (_mic != null) Microphone.End(MicDevice);
        if (_session != null) _session.Dispose();
    }
}
