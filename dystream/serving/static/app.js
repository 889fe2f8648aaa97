// The page of `dystream serve`: set up a WebRTC call, show the avatar, poll the call's statistics.
// Protocol (docs/serving.md): POST /api/offer with the SDP offer (microphone first, then the optional own-voice
// track, and a recvonly video transceiver); the answer carries the session id for /api/sessions/<id>.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { pc: null, session: null, poll: null, local: [], audioContext: null, info: null };
window.dystream = state; // for tests and debugging: the session id and the last statistics

function token() {
  return $("token").value.trim();
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 30000);
  try {
    const response = await fetch(path, {
      method, headers, body: body ? JSON.stringify(body) : undefined, signal: controller.signal,
    });
    const data = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(`${response.status}: ${data.error || response.statusText}`);
    return data;
  } finally {
    clearTimeout(timer);
  }
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function loadInfo() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) $("token").value = hash.get("token");
  try {
    state.info = null;
    state.info = await api("GET", "/api/info");
  } catch (err) {
    setStatus("cannot reach the server: " + err.message, true);
    return;
  }
  const select = $("reference");
  select.innerHTML = "";
  for (const name of state.info.references) select.add(new Option(name, "name:" + name));
  select.add(new Option("upload an image…", "upload"));
  const voice = $("voice");
  for (const option of [...voice.options]) if (option.value.startsWith("wav:")) option.remove();
  for (const name of state.info.voices) voice.add(new Option("server wav: " + name, "wav:" + name), 2);
  setStatus(`ready: ${state.info.active}/${state.info.max_sessions} calls in use`);
}

async function offerBody() {
  const ref = $("reference").value;
  let reference;
  if (ref === "upload") {
    const file = $("reference-file").files[0];
    if (!file) throw new Error("choose an image to upload");
    reference = { data: await readDataUrl(file) };
  } else {
    reference = { name: ref.slice(5) };
  }
  const choice = $("voice").value;
  let voice = { source: choice };
  if (choice === "upload") {
    const file = $("voice-file").files[0];
    if (!file) throw new Error("choose a wav file to upload");
    voice = { source: "wav", data: await readDataUrl(file) };
  } else if (choice.startsWith("wav:")) {
    voice = { source: "wav", name: choice.slice(4) };
  }
  return { reference, voice };
}

async function ownVoiceTrack() {
  // a local audio file played into a MediaStream: the avatar's voice as the call's second audio track
  const file = $("voice-file").files[0];
  if (!file) throw new Error("choose an audio file for the avatar's voice");
  const context = (state.audioContext = new AudioContext());
  const buffer = await context.decodeAudioData(await file.arrayBuffer());
  const source = context.createBufferSource();
  source.buffer = buffer;
  const destination = context.createMediaStreamDestination();
  source.connect(destination);
  source.start();
  return destination.stream.getAudioTracks()[0];
}

function waitForIce(pc) {
  // all candidates in the offer (no trickle), bounded in time
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); } };
    const timer = setTimeout(resolve, 5000);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

async function start() {
  $("start").disabled = true;
  setStatus("starting…");
  try {
    if (!state.info) await loadInfo(); // e.g. the token was typed after the page loaded
    if (!state.info) throw new Error("the server did not answer /api/info (token?)");
    const body = await offerBody();
    const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    const pc = (state.pc = new RTCPeerConnection({ iceServers: (state.info && state.info.ice_servers) || [] }));
    state.local = mic.getTracks();
    pc.addTrack(mic.getAudioTracks()[0], mic); // first audio m-line: the partner (the avatar listens)
    if (body.voice.source === "track") {
      const own = await ownVoiceTrack();
      state.local.push(own);
      pc.addTrack(own); // second audio m-line: the avatar's own voice
    }
    pc.addTransceiver("video", { direction: "recvonly" });
    const remote = new MediaStream();
    pc.ontrack = (event) => {
      remote.addTrack(event.track);
      $("video").srcObject = remote;
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") setStatus("connection failed", true);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    const answer = await api("POST", "/api/offer", { sdp: pc.localDescription.sdp, type: "offer", ...body });
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    state.session = answer.session;
    $("video").play().catch(() => {});
    setStatus(`in a call (session ${answer.session}, ${answer.size[0]}x${answer.size[1]})`);
    $("stop").disabled = false;
    state.poll = setInterval(pollStats, 500);
  } catch (err) {
    setStatus("could not start: " + err.message, true);
    await teardown();
    $("start").disabled = false;
  }
}

async function teardown() {
  clearInterval(state.poll);
  state.poll = null;
  for (const track of state.local) track.stop();
  state.local = [];
  if (state.pc) state.pc.close();
  state.pc = null;
  if (state.audioContext) state.audioContext.close();
  state.audioContext = null;
}

async function stop() {
  $("stop").disabled = true;
  const session = state.session;
  await teardown();
  if (session) {
    try {
      showStats(await api("DELETE", "/api/sessions/" + session));
      setStatus("call ended");
    } catch (err) {
      setStatus("hang-up failed: " + err.message, true);
    }
  }
  $("start").disabled = false;
}

async function pollStats() {
  if (!state.session) return;
  try {
    const stats = await api("GET", "/api/sessions/" + state.session);
    showStats(stats);
    if (stats.state === "closed") {
      setStatus(`the call ended: ${stats.reason}${stats.error ? " (" + stats.error + ")" : ""}`, stats.reason !== "hung up");
      await teardown();
      $("stop").disabled = true;
      $("start").disabled = false;
    }
  } catch (err) {
    setStatus("statistics unavailable: " + err.message, true);
  }
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  if (typeof value === "object" && "median" in value) {
    return `${fmt(value.median)} (p95 ${fmt(value.p95)})`;
  }
  return String(value);
}

function showStats(stats) {
  state.stats = stats;
  const video = $("video");
  const quality = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
  const rows = [
    ["state", stats.state],
    ["frames generated", stats.frames_generated],
    ["frames sent", stats.frames_sent],
    ["frames late (held)", stats.frames_late],
    ["frames dropped", stats.frames_dropped],
    ["input skipped (frames)", stats.input_skipped_frames],
    ["audio in → frame out (s)", stats.latency_s],
    ["first-frame delay (s)", stats.first_frame_delay_s],
    ["RTF DiT", stats.rtf_dit],
    ["RTF VAE", stats.rtf_vae],
    ["RTF audio", stats.rtf_audio],
    ["sound − picture release (ms)", stats.av_offset_ms],
    ["policy", stats.policy],
    ["voice / clock", `${stats.voice} / ${stats.clock}`],
    ["video played (s)", video.currentTime],
    ["frames decoded by the page", quality ? quality.totalVideoFrames : null],
  ];
  const body = $("stats").tBodies[0];
  body.innerHTML = "";
  for (const [name, value] of rows) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = fmt(value);
  }
}

function bind() {
  $("reference").addEventListener("change", () => {
    $("reference-file-label").hidden = $("reference").value !== "upload";
  });
  $("reference-file").addEventListener("change", () => {
    const file = $("reference-file").files[0];
    const preview = $("reference-preview");
    preview.hidden = !file;
    if (file) preview.src = URL.createObjectURL(file);
  });
  $("voice").addEventListener("change", () => {
    const v = $("voice").value;
    $("voice-file-label").hidden = !(v === "upload" || v === "track");
  });
  $("token").addEventListener("change", loadInfo);
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  window.addEventListener("pagehide", () => {
    // hang up when the page goes away (the server's idle timeout is the fallback)
    if (!state.session) return;
    const headers = token() ? { Authorization: "Bearer " + token() } : {};
    fetch("/api/sessions/" + state.session, { method: "DELETE", headers, keepalive: true }).catch(() => {});
    teardown();
  });
  loadInfo();
}

bind();
