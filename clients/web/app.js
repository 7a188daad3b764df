// The web client of `avatar serve` (no build step): pick an avatar, send the microphone (or an
// audio file) over WebRTC, watch the avatar speak it, with a live overlay of frames/s and latency.
//
// URL parameters: ?token=<bearer token> (when the server asks for one), avatar=<id>,
// input=mic|file|none, steps=<n>, hear=0|1 (play the avatar's audio; default: not with the
// microphone, whose voice it would echo), autostart=1 (start at once; a kiosk, or the browser test).
// `window.avatarClient` exposes the state and the numbers of the overlay to scripts and tests.

const params = new URLSearchParams(location.search);
const token = params.get("token");
const $ = (id) => document.getElementById(id);
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]", "::1"]);

let current = null; // the running session: {pc, id, ...}; null when stopped

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

// A call to the server: JSON in and out; a non-2xx answer throws its {"error": ...} text.
async function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(path, { ...init, headers });
  const text = await r.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = { error: text.trim() || r.statusText };
  }
  if (!r.ok) throw new ApiError(r.status, body.error || `${r.status} ${r.statusText}`, r.headers.get("Retry-After"));
  return body;
}

// -- avatars ------------------------------------------------------------------------------------

async function loadAvatars(select) {
  const { avatars } = await api("avatars");
  const el = $("avatar");
  el.replaceChildren(...avatars.map((a) => new Option(`${a.id} (${a.source}, ${a.width}×${a.height})`, a.id)));
  if (select && avatars.some((a) => a.id === select)) el.value = select;
  return avatars;
}

async function uploadPortrait(file) {
  setStatus(`preparing ${file.name}: finding the face…`);
  try {
    const entry = await api("avatars", { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } });
    await loadAvatars(entry.id);
    setStatus(`avatar ${entry.id} is ready (${entry.width}×${entry.height}); press start.`);
  } catch (e) {
    setStatus(`${file.name}: ${e.message}`, true);
  }
}

// -- the connection -----------------------------------------------------------------------------

// Resolve once ICE gathering is complete (the server takes one offer with every candidate), or once
// no candidate came for settleMs after the last one (with no ICE servers every candidate is a host
// candidate, all found at once; Chrome still takes ~150 ms to call gathering complete), or after timeoutMs.
function gathered(pc, { timeoutMs = 3000, settleMs = 40 } = {}) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    let settle = null;
    const done = () => {
      clearTimeout(timer);
      clearTimeout(settle);
      pc.removeEventListener("icegatheringstatechange", check);
      pc.removeEventListener("icecandidate", onCandidate);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const onCandidate = (e) => {
      if (!e.candidate) return done();
      clearTimeout(settle);
      settle = setTimeout(done, settleMs);
    };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
    pc.addEventListener("icecandidate", onCandidate);
  });
}

// A page served from loopback talks to a server on this machine: when the browser offers loopback
// candidates, offer only those, so that no media socket is tried on the machine's other interfaces.
function keepLoopbackCandidates(sdp) {
  const lines = sdp.split("\r\n");
  const address = (l) => l.split(" ")[4];
  const isCandidate = (l) => l.startsWith("a=candidate:");
  const isLoopback = (l) => ["127.0.0.1", "::1"].includes(address(l));
  if (!lines.some((l) => isCandidate(l) && isLoopback(l))) return sdp;
  return lines.filter((l) => !isCandidate(l) || isLoopback(l)).join("\r\n");
}

async function audioInput(kind) {
  if (kind === "none") return { track: null, stop: () => {} };
  if (kind === "mic") {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this page cannot use a microphone here: browsers allow it only over https or on localhost / 127.0.0.1");
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (e) {
      const why = e.name === "NotAllowedError" ? "the microphone was refused: allow it for this page"
        : e.name === "NotFoundError" ? "no microphone found" : `${e.name}: ${e.message}`;
      throw new Error(why);
    }
    return { track: stream.getAudioTracks()[0], stop: () => stream.getTracks().forEach((t) => t.stop()) };
  }
  const file = $("audiofile").files[0];
  if (!file) throw new Error("choose an audio file first (beside 'input')");
  const ctx = new AudioContext();
  const close = () => ctx.state !== "closed" && ctx.close().catch(() => {});
  let buffer;
  try {
    // suspended without a user gesture (a scripted start), it would send silence; resume() may never settle then
    await Promise.race([ctx.resume(), new Promise((r) => setTimeout(r, 1000))]);
    if (ctx.state !== "running") throw new Error("the browser keeps audio suspended: press start (a click) to play a file");
    buffer = await ctx.decodeAudioData(await file.arrayBuffer());
  } catch (e) {
    close();
    throw new Error(`${file.name}: ${e.message || e.name}`);
  }
  const dest = ctx.createMediaStreamDestination();
  const node = ctx.createBufferSource();
  node.buffer = buffer;
  node.connect(dest); // not to the speakers: the avatar plays it back, in sync with its lips
  return { track: dest.stream.getAudioTracks()[0], begin: () => node.start(), stop: close };
}

// Release what a session holds (each part once, whenever it was made): its stats timer, the
// server's session (DELETE, kept alive through a page close), the peer connection, the input.
function teardown(s) {
  s.stopped = true;
  clearInterval(s.timer);
  if (s.id && !s.deleted) {
    s.deleted = true;
    api(`sessions/${s.id}`, { method: "DELETE", keepalive: true }).catch(() => {}); // the server may have closed it already
  }
  if (s.pc) s.pc.close();
  if (s.input && !s.inputStopped) {
    s.inputStopped = true;
    s.input.stop();
  }
}

function resetView() {
  const video = $("video");
  video.srcObject = null;
  video.controls = false;
  $("overlay").textContent = "";
  $("start").disabled = false;
  $("stop").disabled = true;
  setControls(true);
}

async function start() {
  if (current) return;
  const avatar = $("avatar").value;
  const steps = $("steps").value;
  const t0 = performance.now();
  const s = { id: null, t0, firstFrameMs: null, connectedMs: null, marks: {}, frames: [], stats: {}, prev: null, records: null,
    stopped: false };
  current = s;
  $("start").disabled = true;
  $("stop").disabled = false;
  // stop() may run during any await below: after each, a stopped session releases what it made since
  const stoppedMeanwhile = () => s.stopped && (teardown(s), true);
  const kind = (s.kind = $("input").value);
  setControls(false);
  // the input (the microphone's permission prompt, a file's decoding) is awaited only once the
  // session is answered: the avatar shows up meanwhile, and its audio track gets the input when ready.
  // An input that fails is reported first, whatever else failed meanwhile.
  const inputReady = audioInput(kind).then((input) => {
    s.input = input;
    mark(s, "input");
    if (s.stopped) teardown(s); // stopped meanwhile: release it at once
    if (input.track) input.track.onended = () => ended(s, "the microphone stopped (unplugged, or its permission revoked)");
    return input;
  });
  inputReady.catch((e) => (s.inputError = e));
  const failedInput = () => {
    if (s.inputError) throw s.inputError;
  };
  try {
    setStatus("starting…");
    if (kind === "file" && !$("audiofile").files[0]) throw new Error("choose an audio file first (beside 'input')");
    // the server's STUN / TURN servers (avatar serve --ice-server); none: host candidates only
    const iceServers = await api("ice-servers").then((j) => j.iceServers || []).catch(() => []);
    const pc = new RTCPeerConnection({ iceServers });
    s.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    const audio = pc.addTransceiver("audio", { direction: kind === "none" ? "recvonly" : "sendrecv" });
    const remote = new MediaStream();
    pc.ontrack = (e) => remote.addTrack(e.track);
    pc.onconnectionstatechange = () => onConnectionState(s);

    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    mark(s, "ice");
    if (stoppedMeanwhile()) return;
    failedInput();
    let sdp = pc.localDescription.sdp;
    if (LOOPBACK.has(location.hostname)) sdp = keepLoopbackCandidates(sdp);
    const body = { sdp, type: "offer", avatar };
    if (steps) body.steps = Number(steps);
    const answer = await api("offer", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
    s.id = answer.session_id;
    mark(s, "answer");
    if (stoppedMeanwhile()) return;
    failedInput();
    setStatus(`session ${s.id}: connecting…`);
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    if (stoppedMeanwhile()) return;

    const video = $("video");
    video.srcObject = remote;
    video.requestVideoFrameCallback((now, meta) => onFrame(s, now, meta));
    s.timer = setInterval(() => refreshStats(s), 1000);
    // play() stays pending until the first frame; stopping before it rejects with AbortError (not a refusal)
    video.play().catch((e) => {
      if (current === s && e.name === "NotAllowedError") {
        s.needsPlay = true; // autoplay refused: the user starts it (the hint stays until the video plays)
        video.controls = true;
        video.addEventListener("play", () => ((s.needsPlay = false), showState(s)), { once: true });
        showState(s);
      }
    });
    const input = await inputReady;
    if (stoppedMeanwhile()) return;
    if (input.track) await audio.sender.replaceTrack(input.track);
    if (stoppedMeanwhile()) return;
    s.attached = true;
    begin(s);
    showState(s);
  } catch (err) {
    teardown(s);
    if (current !== s) return; // stopped (and maybe started again) meanwhile: not this session's page any more
    current = null;
    resetView();
    const e = s.inputError || err;
    const extra = e.status === 503 && e.retryAfter ? ` (retry in ${e.retryAfter} s)` : "";
    setStatus(`could not start: ${e.message}${extra}`, true);
  }
}

function onConnectionState(s) {
  if (current !== s) return;
  const state = s.pc.connectionState;
  if (state === "connected") {
    if (s.connectedMs === null) {
      s.connectedMs = performance.now() - s.t0;
      mark(s, "connect");
    }
    begin(s);
    showState(s);
  } else if (state === "disconnected") {
    setStatus(`session ${s.id}: the connection is interrupted; waiting for it to come back…`, true);
  } else if (state === "failed") {
    ended(s, "the connection failed");
  }
}

// A file input starts playing once both it and the connection are ready (whichever comes last).
function begin(s) {
  if (s.begun || !s.attached || !s.input.track || s.pc.connectionState !== "connected") return;
  s.begun = true;
  if (s.input.begin) s.input.begin();
}

// The status line of a running session: what it waits for, or what the user may do.
function showState(s) {
  if (current !== s || !s.pc || s.pc.connectionState !== "connected") return;
  const what = s.needsPlay ? "press play on the video (the browser blocked autoplay)"
    : s.kind === "none" ? "watching it idle"
    : !s.attached ? (s.kind === "mic" ? "waiting for the microphone (allow it in the browser's prompt)" : "reading the file…")
    : s.kind === "mic" ? "speak" : "playing the file";
  setStatus(`session ${s.id}: connected; ${what}.`);
}

function setControls(enabled) {
  for (const id of ["avatar", "input", "steps", "audiofile"]) $(id).disabled = !enabled;
}

// The session is over without the user stopping it: say why, release the rest.
function ended(s, why) {
  if (current !== s) return;
  stop(true);
  setStatus(`session ${s.id}: ${why}.`, true);
}

function stop(keepStatus = false) {
  const s = current;
  if (!s) return;
  current = null;
  teardown(s);
  resetView();
  if (!keepStatus) setStatus("stopped.");
}

// -- what the page shows: frames/s and latency ---------------------------------------------------

function onFrame(s, now, meta) {
  if (current !== s) return;
  if (s.firstFrameMs === null) {
    s.firstFrameMs = performance.now() - s.t0;
    mark(s, "frame");
  }
  s.frames.push(now);
  while (s.frames.length && s.frames[0] < now - 2000) s.frames.shift();
  if (s.records && s.records.items.length < s.records.max) record(s, meta);
  $("video").requestVideoFrameCallback((n, m) => onFrame(s, n, m));
}

function fps(s) {
  const f = s.frames;
  const now = performance.now();
  while (f.length && f[0] < now - 2000) f.shift(); // frames of the last 2 s: 0 when they stopped coming
  if (f.length < 2) return 0;
  return ((f.length - 1) * 1000) / Math.max(now - f[0], f[f.length - 1] - f[0]);
}

async function refreshStats(s) {
  if (current !== s || !s.pc || s.polling) return; // one poll at a time
  s.polling = true;
  try {
    await poll(s);
  } catch (e) {
    if (current === s) s.stats.pollError = String(e);
  } finally {
    s.polling = false;
  }
}

async function poll(s) {
  const out = { fps: fps(s), firstFrameMs: s.firstFrameMs, connectedMs: s.connectedMs, marks: s.marks, state: s.pc.connectionState };
  const report = await s.pc.getStats();
  if (current !== s) return;
  let video = null;
  let pair = null;
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") video = r;
    if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") pair = r;
  });
  if (video) {
    const p = s.prev || {};
    const emitted = (video.jitterBufferEmittedCount || 0) - (p.jitterBufferEmittedCount || 0);
    const decoded = (video.framesDecoded || 0) - (p.framesDecoded || 0);
    out.jitterBufferMs = emitted > 0 ? (1000 * ((video.jitterBufferDelay || 0) - (p.jitterBufferDelay || 0))) / emitted : null;
    out.decodeMs = decoded > 0 ? (1000 * ((video.totalDecodeTime || 0) - (p.totalDecodeTime || 0))) / decoded : null;
    out.width = video.frameWidth;
    out.height = video.frameHeight;
    out.framesReceived = video.framesReceived;
    out.framesDropped = video.framesDropped || 0;
    s.prev = video;
  }
  out.rttMs = pair && pair.currentRoundTripTime !== undefined ? 1000 * pair.currentRoundTripTime : null;
  try {
    const info = await api(`sessions/${s.id}`);
    const send = info.metrics.stages.send_latency;
    out.serverFps = info.metrics.fps;
    out.serverLatencyMs = send && send.count ? send.p50_ms : null;
    out.steps = info.steps;
    out.input = info.input;
  } catch (e) {
    if (e.status === 404 || e.status === 410) {
      s.deleted = true; // nothing left to DELETE
      ended(s, e.status === 410 ? e.message.replace(/^session \S+ /, "") : "the server closed the session");
      return;
    }
    out.serverError = e.message;
  }
  if (out.serverLatencyMs !== null && out.serverLatencyMs !== undefined) {
    out.latencyMs = out.serverLatencyMs + (out.rttMs || 0) / 2 + (out.jitterBufferMs || 0) + (out.decodeMs || 0);
  }
  s.stats = out;
  if (current === s) $("overlay").textContent = overlayText(s, out);
}

const ms = (v) => (v === null || v === undefined ? "–" : `${Math.round(v)}`);

// Milliseconds since start at each step of starting a session: where the time to the first frame goes.
function mark(s, name) {
  s.marks[name] = performance.now() - s.t0;
}

// "ice +40 · input +12 · answer +20 ...": each step's own share of the time to the first frame
function steps(marks) {
  let last = 0;
  return Object.entries(marks || {})
    .map(([name, t]) => {
      const d = t - last;
      last = t;
      return `${name} +${Math.round(d)}`;
    })
    .join(" · ");
}

function overlayText(s, st) {
  const lines = [`fps      ${st.fps.toFixed(1)} (server ${st.serverFps === undefined ? "–" : st.serverFps.toFixed(1)})`];
  if (st.latencyMs !== undefined) {
    lines.push(`latency  ≈ ${ms(st.latencyMs)} ms`);
    lines.push(`         server ${ms(st.serverLatencyMs)} · net ${ms((st.rttMs || 0) / 2)} · buffer ${ms(st.jitterBufferMs)} · decode ${ms(st.decodeMs)}`);
  } else {
    lines.push("latency  – (no speech yet)");
  }
  lines.push(`first    frame ${ms(st.firstFrameMs)} ms after start`);
  lines.push(`         ${steps(st.marks)}`);
  lines.push(`video    ${st.width || "–"}×${st.height || "–"} · dropped ${st.framesDropped ?? "–"} · denoising steps ${st.steps ?? "–"}`);
  lines.push(`session  ${s.id} · ${st.state}${st.serverError ? ` · ${st.serverError}` : ""}`);
  return lines.join("\n");
}

// -- for scripts and tests: copies of a region of the frames as shown, with their RTP timestamps --

function record(s, meta) {
  const { x, y, w, h } = s.records.region;
  const c = s.records.canvas;
  const g = c.getContext("2d", { willReadFrequently: true });
  g.drawImage($("video"), x, y, w, h, 0, 0, w, h);
  const rgba = g.getImageData(0, 0, w, h).data;
  let bin = "";
  for (let i = 0; i < rgba.length; i += 4) bin += String.fromCharCode(rgba[i], rgba[i + 1], rgba[i + 2]);
  s.records.items.push({ rtp: meta.rtpTimestamp ?? null, t: performance.now(), rgb: btoa(bin) });
}

window.avatarClient = {
  get session() {
    return current ? { id: current.id, state: current.pc ? current.pc.connectionState : "new", stats: current.stats } : null;
  },
  status: () => ({ text: $("status").textContent, error: $("status").classList.contains("error") }),
  start,
  stop,
  // Keep up to `max` copies of the rectangle (x, y, w, h) of the video's own pixels, one per frame shown.
  record(region, max = 200) {
    if (!current) throw new Error("not started");
    const canvas = document.createElement("canvas");
    canvas.width = region.w;
    canvas.height = region.h;
    current.records = { region, max, canvas, items: [] };
  },
  takeRecords() {
    if (!current || !current.records) return [];
    const items = current.records.items;
    current.records.items = [];
    return items;
  },
};

// -- wiring -------------------------------------------------------------------------------------

$("controls").addEventListener("submit", (e) => {
  e.preventDefault();
  start();
});
$("stop").addEventListener("click", () => stop());
$("portrait").addEventListener("change", (e) => e.target.files[0] && uploadPortrait(e.target.files[0]));
// The avatar speaks what it hears: with the microphone that is your own voice ~0.2 s late, which is
// hard to talk over, so it is muted unless asked for; a file or a voice agent's speech is heard.
const syncHear = () => ($("hear").checked = $("input").value !== "mic");
const showFileInput = () => ($("audiofile").hidden = $("input").value !== "file");
$("input").addEventListener("change", () => (showFileInput(), syncHear(), applyHear()));
const applyHear = () => ($("video").muted = !$("hear").checked);
$("hear").addEventListener("change", applyHear);
window.addEventListener("pagehide", () => stop(true));
if (token) {
  for (const a of document.querySelectorAll("footer a")) a.href += `?token=${encodeURIComponent(token)}`;
}

(async () => {
  for (const [name, id] of [["input", "input"], ["steps", "steps"]]) {
    const v = params.get(name);
    if (v === null) continue;
    if ([...$(id).options].some((o) => o.value === v)) $(id).value = v;
    else setStatus(`?${name}=${v} is not one of: ${[...$(id).options].map((o) => o.value || "''").join(", ")}`, true);
  }
  showFileInput();
  syncHear();
  if (params.has("hear")) $("hear").checked = params.get("hear") === "1";
  applyHear();
  try {
    await loadAvatars(params.get("avatar"));
  } catch (e) {
    setStatus(`cannot list the avatars: ${e.message}${e.status === 401 ? " (open this page with ?token=<token>)" : ""}`, true);
    return;
  }
  if (params.get("autostart") === "1") start();
})();
