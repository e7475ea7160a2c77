// Sample: drive avatars' heads with TIMAR in live conversations.
//
// Put this on each GameObject that has an agent's AudioSource (its voice: TTS or a recording).
// The user's voice comes from a microphone (or a second AudioSource). All heads that name the
// same bundle share one TimarModel (its graphs are loaded once) whose native worker thread runs
// every head's turns, batched: each head is one TimarSession of that model. No inference ever
// runs on Unity's main thread or the audio thread:
//  - the audio thread (OnAudioFilterRead) resamples the agent's voice and hands it to
//    TimarSession.Accept, which only checks and buffers it;
//  - the main thread reads the microphone in Update (Accept again), and in LateUpdate polls the
//    motion the worker produced (PollMotion) and applies it at 25 fps: jaw pose -> jaw bone,
//    neck pose -> head/neck bone, expression -> blendshapes.
//
// Motion for a turn is available once the whole turn's audio has arrived (turn_seconds = 1 s)
// plus compute time, so playback runs `playbackDelaySeconds` behind the audio. To lip-sync the
// agent, delay the agent's audible output by the same amount (e.g. route the AudioSource through
// a delay, or feed TIMAR the TTS audio ahead of playing it).
using System;
using System.Collections.Generic;
using System.IO;
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

    [Header("Output smoothing")]
    [Tooltip("Default: the bundle's (its manifest's smoothing, none if it has none). Off: the exact model "
             + "output. Custom: the time constants below.")]
    public TimarSmoothing smoothing = TimarSmoothing.Default;
    [Tooltip("Custom only: seconds per region, 0 = not smoothed. A region lags by about its time constant.")]
    [Range(0f, 2f)] public float smoothingExpression = 0.1f;
    [Range(0f, 2f)] public float smoothingJaw = 0.03f;
    [Range(0f, 2f)] public float smoothingNeck = 0.25f;

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

    // One model per bundle folder, shared by the heads that use it; disposed with the last one.
    sealed class SharedModel
    {
        public TimarModel Model;
        public int Users;
    }
    static readonly Dictionary<string, SharedModel> s_models = new Dictionary<string, SharedModel>();

    static TimarModel AcquireModel(string path)
    {
        lock (s_models)
        {
            SharedModel shared;
            if (!s_models.TryGetValue(path, out shared))
            {
                var model = new TimarModel(path);   // loads the graphs once
                model.StartWorker();                // every head's turns run here, batched
                shared = new SharedModel { Model = model };
                s_models.Add(path, shared);
            }
            shared.Users++;
            return shared.Model;
        }
    }

    static void ReleaseModel(string path)
    {
        lock (s_models)
        {
            SharedModel shared;
            if (!s_models.TryGetValue(path, out shared) || --shared.Users > 0) return;
            s_models.Remove(path);
            shared.Model.Dispose();   // stops the worker; sessions still open keep the graphs
        }
    }

    string _bundlePath;
    TimarSession _session;
    volatile bool _running;
    int _sampleRate, _fps;
    bool _userAudioFed;                      // a microphone or user AudioSource feeds the user stream
    readonly Queue<float[]> _frames = new Queue<float[]>();
    float[] _polled;                         // one turn, PollMotion's buffer
    float[] _agent16k = new float[0], _silence = new float[0];   // the audio thread's buffers
    float[] _user16k = new float[0];
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
        _bundlePath = Path.Combine(Application.streamingAssetsPath, bundleFolder);
        var options = TimarSessionOptions.Default;
        options.Seed = seed;
        options.Cfg = cfg;
        options.Smoothing = (int)smoothing;
        if (smoothing == TimarSmoothing.Custom)   // the time constants are read (and allowed) only then
        {
            options.SmoothingExpression = smoothingExpression;
            options.SmoothingJaw = smoothingJaw;
            options.SmoothingNeck = smoothingNeck;
        }
        TimarModel model = null;
        try
        {
            model = AcquireModel(_bundlePath);
            _session = new TimarSession(model, options);
        }
        catch (Exception e)   // TimarException (bad bundle) or DllNotFoundException (no native library)
        {
            Debug.LogError("TIMAR: " + e.Message);
            if (model != null) ReleaseModel(_bundlePath);
            _bundlePath = null;
            enabled = false;
            return;
        }
        _sampleRate = model.SampleRate;
        _fps = model.Fps;
        _polled = new float[model.FramesPerTurn * TimarSession.MotionDim];
        Debug.Log("TIMAR " + TimarSession.Version + " on " + model.BackendName);
        if (jawBone) _jawRest = jawBone.localRotation;
        if (headBone) _headRest = headBone.localRotation;
        if (useMicrophone && userSource == null)
            _mic = Microphone.Start(MicDevice, true, 2, _sampleRate);
        _userAudioFed = _mic != null || userSource != null;
        _running = true;
    }

    // Agent voice, on the audio thread: downmix, resample to the bundle's rate, buffer (no
    // inference here). Without a user audio source the user's stream is silence of equal length.
    void OnAudioFilterRead(float[] data, int channels)
    {
        if (!_running) return;
        int n = Resample(data, channels, _outputRate, ref _agent16k, ref _resampleAgent);
        if (n == 0) return;
        if (!_userAudioFed && _silence.Length < n) _silence = new float[_agent16k.Length];
        try
        {
            _session.Accept(_userAudioFed ? null : _silence, 0, _userAudioFed ? 0 : n, null, 0, 0, _agent16k, 0, n);
        }
        catch (ObjectDisposedException)   // the head is being destroyed
        {
        }
    }

    void Update()
    {
        if (!_running) return;
        if (_mic != null)
        {
            int pos = Microphone.GetPosition(MicDevice);
            FeedUser(_mic, pos);
        }
        else if (userSource != null && userSource.isPlaying && userSource.clip != null)
        {
            FeedUser(userSource.clip, userSource.timeSamples);   // what the user source played since the last frame
        }
    }

    // The user's samples from the looping clip since the last read: resampled and buffered (cheap).
    void FeedUser(AudioClip clip, int pos)
    {
        int n = (pos - _micPos + clip.samples) % clip.samples;
        if (n <= 0) return;
        var buf = new float[n * clip.channels];
        clip.GetData(buf, _micPos);   // wraps around the looping clip
        _micPos = pos;
        int m = Resample(buf, clip.channels, clip.frequency, ref _user16k, ref _resampleUser);
        try
        {
            _session.Accept(_user16k, 0, m, null, 0, 0, null, 0, 0);
        }
        catch (TimarException e)
        {
            Debug.LogWarning("TIMAR: " + e.Message);
        }
    }

    // Linear resampling to the bundle's rate into `into` (grown when needed); returns the samples
    // written. `phase` carries the fractional position from call to call.
    int Resample(float[] data, int channels, int rate, ref float[] into, ref double phase)
    {
        int frames = data.Length / channels;
        double step = (double)rate / _sampleRate;
        int capacity = (int)(frames / step) + 2;
        if (into.Length < capacity) into = new float[capacity];
        int written = 0;
        for (; phase < frames - 1; phase += step)
        {
            int i = (int)phase;
            double frac = phase - i;
            float a = 0, b = 0;
            for (int c = 0; c < channels; c++) { a += data[i * channels + c]; b += data[(i + 1) * channels + c]; }
            into[written++] = (float)((a + (b - a) * frac) / channels);
        }
        phase -= frames;
        if (phase < 0) phase = 0;
        return written;
    }

    // Main thread: take the turns the model's worker finished, then play them at the bundle's fps.
    void LateUpdate()
    {
        PollTurns();
        if (_startTime < 0 && _frames.Count > 0) _startTime = Time.timeAsDouble;
        if (_startTime < 0) return;
        long due = (long)((Time.timeAsDouble - _startTime) * _fps);
        while (_framesPlayed <= due && _frames.Count > 0) { _current = _frames.Dequeue(); _framesPlayed++; }
        if (_current != null) Apply(_current);
    }

    void PollTurns()
    {
        while (true)
        {
            int frames;
            try
            {
                ulong turn;
                double start;
                frames = _session.PollMotion(_polled, out turn, out start);
            }
            catch (TimarException e)   // a turn that failed; the conversation goes on
            {
                Debug.LogWarning("TIMAR: " + e.Message);
                continue;
            }
            if (frames == 0) return;
            for (int f = 0; f < frames; f++)
            {
                var frame = new float[TimarSession.MotionDim];
                Array.Copy(_polled, f * TimarSession.MotionDim, frame, 0, frame.Length);
                _frames.Enqueue(frame);
            }
        }
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
        if (_mic != null) Microphone.End(MicDevice);
        if (_session != null) _session.Dispose();   // waits for an Accept in progress on the audio thread
        if (_bundlePath != null) ReleaseModel(_bundlePath);
    }
}
