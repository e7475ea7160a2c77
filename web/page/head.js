// A stylised head in three.js, driven like the Python preview head (timar_sdk/render/head.py):
// neck pose 53..55 (axis-angle) turns the head about the top of the neck; jaw 50..52 turns the
// jaw, chin and lower lip about the jaw hinge by JAW_SCALE times the FLAME angle, the lips staying
// sealed over the first LIP_SEAL radians (longer while exp[5] presses them); exp[0..6] drive
// stylised mouth and brow shapes. Metres, y up, the face looking down +z.
import * as THREE from 'three';

const JAW_SCALE = 0.75;
const LIP_SEAL = 0.03;
const JAW_HINGE = new THREE.Vector3(0, -0.030, -0.006);
const NECK_PIVOT = new THREE.Vector3(0, -0.075, -0.020);
const MOUTH_Y = -0.058;
const COLORS = { skin: 0xdba385, lips: 0xb36b66, hair: 0x33210f, brows: 0x291a12, iris: 0x4d331a, shirt: 0x335c94,
  mouth: 0x2a0d10, teeth: 0xf2efe6, white: 0xf5f3ef, pupil: 0x0a0a0a };

const mat = (color, rough = 0.65) => new THREE.MeshStandardMaterial({ color, roughness: rough, metalness: 0 });
function ellipsoid(r, color, pos, segs = 48) {
  const m = new THREE.Mesh(new THREE.SphereGeometry(1, segs, segs / 2), typeof color === 'number' ? mat(color) : color);
  m.scale.set(...r);
  m.position.set(...pos);
  return m;
}
/** A group whose origin is `pivot` (head coordinates), so children are placed in head coordinates. */
function pivotGroup(parent, pivot) {
  const g = new THREE.Group();
  g.position.copy(pivot);
  const inner = new THREE.Group();
  inner.position.copy(pivot).negate();
  g.add(inner);
  parent.add(g);
  return [g, inner];
}

export class Head {
  constructor(canvas) {
    this.renderer = new THREE.WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(Math.min(2, window.devicePixelRatio || 1));
    this.renderer.setSize(canvas.clientWidth, canvas.clientHeight, false);
    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(0x2b3340);
    this.camera = new THREE.PerspectiveCamera(24, canvas.clientWidth / canvas.clientHeight, 0.05, 5);
    this.camera.position.set(0.1, 0.0, 0.8);
    this.camera.lookAt(0, -0.055, 0);
    this.scene.add(new THREE.HemisphereLight(0xdfe8ff, 0x3a2a20, 1.4));
    const key = new THREE.DirectionalLight(0xffffff, 2.2);
    key.position.set(0.4, 0.5, 0.8);
    this.scene.add(key);
    const rim = new THREE.DirectionalLight(0x9fc0ff, 1.0);
    rim.position.set(-0.6, 0.3, -0.5);
    this.scene.add(rim);
    this.build();
  }

  build() {
    const skin = mat(COLORS.skin, 0.6);
    // torso and neck stay; the head turns about NECK_PIVOT
    this.scene.add(ellipsoid([0.17, 0.07, 0.09], COLORS.shirt, [0, -0.215, -0.03]));
    const neck = new THREE.Mesh(new THREE.CylinderGeometry(0.034, 0.04, 0.12, 32), skin);
    neck.position.set(0, -0.125, -0.02);
    this.scene.add(neck);
    const [headPivot, head] = pivotGroup(this.scene, NECK_PIVOT);
    this.headPivot = headPivot;
    head.add(ellipsoid([0.074, 0.094, 0.086], skin, [0, 0.012, -0.004]));              // cranium
    head.add(ellipsoid([0.064, 0.052, 0.074], skin, [0, -0.03, 0.004]));                // cheeks
    head.add(ellipsoid([0.036, 0.026, 0.03], skin, [0, -0.048, 0.052]));                // muzzle above the lip
    const hair = new THREE.Mesh(new THREE.SphereGeometry(1, 48, 24, 0, Math.PI * 2, 0, Math.PI * 0.56), mat(COLORS.hair, 0.9));
    hair.scale.set(0.079, 0.099, 0.091);
    hair.position.set(0, 0.013, -0.006);
    hair.rotation.x = -0.55;
    head.add(hair);
    for (const s of [-1, 1]) {
      head.add(ellipsoid([0.009, 0.02, 0.013], skin, [s * 0.074, -0.004, -0.006]));      // ears
      head.add(ellipsoid([0.0125, 0.0125, 0.0125], COLORS.white, [s * 0.0325, 0.002, 0.064]));
      head.add(ellipsoid([0.0066, 0.0066, 0.003], COLORS.iris, [s * 0.0325, 0.002, 0.0765]));
      head.add(ellipsoid([0.0032, 0.0032, 0.0015], COLORS.pupil, [s * 0.0325, 0.002, 0.0792]));
      const lid = new THREE.Mesh(new THREE.SphereGeometry(0.0133, 32, 16, 0, Math.PI * 2, 0, Math.PI * 0.38), skin);
      lid.position.set(s * 0.0325, 0.002, 0.064);
      lid.rotation.x = 0.35;
      head.add(lid);
    }
    this.brows = [-1, 1].map((s) => {
      const b = ellipsoid([0.014, 0.0028, 0.004], COLORS.brows, [s * 0.033, 0.022, 0.075], 24);
      b.userData = { side: s, rest: b.position.clone() };
      b.rotation.z = -s * 0.12;
      head.add(b);
      return b;
    });
    const nose = new THREE.Mesh(new THREE.ConeGeometry(0.011, 0.035, 24), skin);
    nose.position.set(0, -0.018, 0.086);
    nose.rotation.x = -0.45;
    head.add(nose);
    head.add(ellipsoid([0.011, 0.008, 0.009], skin, [0, -0.033, 0.089]));               // nose tip
    // mouth: cavity, upper teeth, upper lip on the head; the jaw carries chin, lower teeth; the
    // lower lip follows the jaw less (the lip seal)
    this.cavity = ellipsoid([0.021, 0.012, 0.006], COLORS.mouth, [0, MOUTH_Y - 0.004, 0.068], 32);
    head.add(this.cavity);
    head.add(ellipsoid([0.018, 0.004, 0.004], COLORS.teeth, [0, MOUTH_Y + 0.0025, 0.072], 24));
    this.upperLip = ellipsoid([0.024, 0.0048, 0.0075], COLORS.lips, [0, MOUTH_Y + 0.0035, 0.0745], 32);
    head.add(this.upperLip);
    const [jaw, jawInner] = pivotGroup(head, JAW_HINGE);
    this.jaw = jaw;
    jawInner.add(ellipsoid([0.05, 0.032, 0.058], skin, [0, -0.068, 0.014]));          // jaw and chin
    jawInner.add(ellipsoid([0.016, 0.0035, 0.004], COLORS.teeth, [0, MOUTH_Y - 0.006, 0.069], 24));
    const [lip, lipInner] = pivotGroup(head, JAW_HINGE);
    this.lip = lip;
    this.lowerLip = ellipsoid([0.022, 0.0055, 0.008], COLORS.lips, [0, MOUTH_Y - 0.004, 0.073], 32);
    lipInner.add(this.lowerLip);
    this.rest = { upper: this.upperLip.position.clone(), lower: this.lowerLip.position.clone(),
      upperScale: this.upperLip.scale.clone(), lowerScale: this.lowerLip.scale.clone() };
    this.pose(new Float32Array(56));
  }

  /** Pose the head for one motion frame (56 floats: exp 0..49, jaw 50..52, neck 53..55). */
  pose(frame) {
    const e = Array.from(frame.subarray(0, 7), (v, i) => {
      const c = Math.max(-3, Math.min(3, v));
      return c < 0 && [0, 1, 5, 6].includes(i) ? 0.35 * c : c;   // damp what would push the lips through each other
    });
    const jawX = JAW_SCALE * Math.max(-0.05, Math.min(0.7, frame[50]));
    const seal = LIP_SEAL * (1 + Math.max(e[5], 0));
    const lipX = jawX - seal * Math.tanh(Math.max(jawX, 0) / seal);
    this.jaw.quaternion.copy(axisAngle(jawX, JAW_SCALE * frame[51], JAW_SCALE * frame[52]));
    this.lip.quaternion.copy(axisAngle(lipX, JAW_SCALE * frame[51], JAW_SCALE * frame[52]));
    this.headPivot.quaternion.copy(axisAngle(frame[53], frame[54], frame[55]));
    const r = this.rest;
    // exp0 lips apart, exp1 spread/smile, exp4 rounding, exp5 press, exp6 lower lip tuck
    const width = 1 + 0.16 * e[1] - 0.22 * e[4];
    const thick = Math.max(0.4, 1 - 0.35 * e[5] + 0.2 * e[4]);
    this.upperLip.scale.set(r.upperScale.x * width, r.upperScale.y * thick, r.upperScale.z);
    this.lowerLip.scale.set(r.lowerScale.x * width, r.lowerScale.y * thick, r.lowerScale.z);
    this.upperLip.position.set(0, r.upper.y + 0.003 * e[0] + 0.0015 * e[1], r.upper.z + 0.004 * e[4]);
    this.lowerLip.position.set(0, r.lower.y - 0.004 * e[0] + 0.0025 * e[6] + 0.0015 * e[1], r.lower.z + 0.004 * e[4] - 0.004 * e[6]);
    const gap = Math.max(0, lipX) + 0.1 * Math.max(0, e[0]);     // how far the lips are apart
    this.cavity.scale.set(0.021 * width, 0.004 + 0.09 * gap, 0.006);
    for (const b of this.brows) {
      const s = b.userData.side;
      b.position.set(b.userData.rest.x - s * 0.003 * Math.max(0, e[3]), b.userData.rest.y + 0.006 * e[2] - 0.004 * Math.max(0, e[3]), b.userData.rest.z);
      b.rotation.z = -s * (0.12 - 0.25 * Math.max(0, e[3]) + 0.1 * e[2]);
    }
  }

  render() { this.renderer.render(this.scene, this.camera); }
}

/** A quaternion from an axis-angle vector (radians). */
function axisAngle(x, y, z) {
  const angle = Math.hypot(x, y, z);
  const q = new THREE.Quaternion();
  if (angle > 1e-12) q.setFromAxisAngle(new THREE.Vector3(x / angle, y / angle, z / angle), angle);
  return q;
}
