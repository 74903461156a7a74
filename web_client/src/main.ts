import "./style.css";
import {
  type AgentEvent,
  type CallConnection,
  DirectConnection,
  fetchDirectConfig,
  SignallingError,
} from "./connection";
import { LevelMeter } from "./meter";
import { fetchRoomConfig, type RoomConfig } from "./roomconfig";

type UiState = "idle" | "connecting" | "listening" | "thinking" | "speaking" | "ended";

const STATE_LABELS: Record<UiState, string> = {
  idle: "Ready to call",
  connecting: "Connecting…",
  listening: "Listening",
  thinking: "Thinking…",
  speaking: "Speaking",
  ended: "Call ended",
};

function $(id: string): HTMLElement {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el;
}

const ui = {
  state: $("state"),
  stateLabel: $("state-label"),
  call: $("call") as HTMLButtonElement,
  mute: $("mute") as HTMLButtonElement,
  keyRow: $("key-row"),
  key: $("access-key") as HTMLInputElement,
  error: $("error"),
  latency: $("latency") as HTMLOutputElement,
  transcript: $("transcript") as HTMLOListElement,
  audio: $("agent-audio") as HTMLAudioElement,
  micMeter: $("mic-meter"),
  agentMeter: $("agent-meter"),
  modeRow: $("mode-row"),
  roomNameRow: $("room-name-row"),
  roomName: $("room-name") as HTMLInputElement,
  roomInfo: $("room-info"),
};

type Mode = "direct" | "room";
let roomConfig: RoomConfig | null = null;
let roomLabel = ""; // "Room sg2-…" while in a room
let floorLabel = "";

function mode(): Mode {
  const checked = document.querySelector<HTMLInputElement>('input[name="mode"]:checked');
  return roomConfig && checked?.value === "room" ? "room" : "direct";
}

function setMode(m: Mode): void {
  const radio = document.querySelector<HTMLInputElement>(`input[name="mode"][value="${m}"]`);
  if (radio) radio.checked = true;
  ui.roomNameRow.hidden = m !== "room" || !roomConfig?.allow_room_choice;
  document.body.dataset.mode = m;
}

function showRoomInfo(): void {
  ui.roomInfo.hidden = !roomLabel;
  ui.roomInfo.textContent = [roomLabel, floorLabel].filter(Boolean).join(" · ");
}

let connection: CallConnection | null = null;
let mic: MediaStream | null = null;
let audioCtx: AudioContext | null = null;
let meters: { mic: LevelMeter; agent: LevelMeter } | null = null;
let meterTimer: number | undefined;
let inCall = false;
let attempt = 0; // bumped when a call attempt is abandoned (Hang up pressed while connecting)
const replies = new Map<string, HTMLLIElement>();

function setState(state: UiState, detail?: string): void {
  ui.state.dataset.state = state;
  ui.stateLabel.textContent = detail ? `${STATE_LABELS[state]}: ${detail}` : STATE_LABELS[state];
}

function showError(message: string | null): void {
  ui.error.hidden = !message;
  ui.error.textContent = message ?? "";
}

function setCallButton(calling: boolean): void {
  inCall = calling;
  ui.call.textContent = calling ? "Hang up" : "Call";
  ui.call.setAttribute("aria-label", calling ? "Hang up" : "Start a call");
  ui.call.classList.toggle("danger", calling);
  ui.mute.disabled = !calling;
  if (!calling) setMuted(false);
  document.querySelectorAll<HTMLInputElement>('input[name="mode"], #room-name').forEach((el) => {
    el.disabled = calling;
  });
}

function setMuted(muted: boolean): void {
  mic?.getAudioTracks().forEach((t) => (t.enabled = !muted));
  ui.mute.setAttribute("aria-pressed", String(muted));
  ui.mute.textContent = muted ? "Unmute" : "Mute";
  ui.mute.setAttribute("aria-label", muted ? "Unmute microphone" : "Mute microphone");
}

function micErrorMessage(err: unknown): string {
  const name = err instanceof DOMException ? err.name : "";
  if (name === "NotAllowedError" || name === "SecurityError")
    return "Microphone access was denied. Allow the microphone for this site (the icon in the address bar), then press Call again.";
  if (name === "NotFoundError" || name === "OverconstrainedError")
    return "No microphone was found. Connect one and press Call again.";
  if (name === "NotReadableError")
    return "The microphone is in use by another application or could not be opened.";
  return `Could not open the microphone: ${err instanceof Error ? err.message : String(err)}`;
}

// ------------------------------------------------------------------ transcript
function addItem(cls: string, who: string): HTMLLIElement {
  const li = document.createElement("li");
  li.className = cls;
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = who;
  const text = document.createElement("span");
  text.className = "text";
  const meta = document.createElement("span");
  meta.className = "meta";
  li.append(label, text, meta);
  ui.transcript.append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function part(li: HTMLLIElement, cls: "text" | "meta"): HTMLElement {
  return li.querySelector(`.${cls}`) as HTMLElement;
}

function formatLatency(e: AgentEvent): string {
  const ms = (v: unknown) => `${Math.round(Number(v))} ms`;
  return `${ms(e.total_ms)} (end of turn ${ms(e.endpointing_ms)} · engine ${ms(e.engine_ms)} · transport ${ms(e.transport_ms)})`;
}

function onAgentEvent(e: AgentEvent): void {
  switch (e.type) {
    case "room": {
      // share the room: others who open this link join the same call
      const link = new URL(window.location.href);
      link.searchParams.set("room", String(e.room));
      roomLabel = `Room ${String(e.room)}`;
      ui.roomInfo.dataset.room = String(e.room);
      ui.roomInfo.dataset.link = link.toString();
      setState("connecting", "waiting for the agent");
      showRoomInfo();
      break;
    }
    case "user_turn":
      part(addItem("user", e.you ? "You" : String(e.identity)), "text").textContent = "(spoke)";
      break;
    case "agent_joined":
      if (ui.state.dataset.state === "connecting") setState("connecting", "the agent is joining");
      break;
    case "floor":
      floorLabel = e.you ? "the agent listens to you" : `the agent listens to ${String(e.identity)}`;
      ui.roomInfo.dataset.floor = String(e.identity);
      showRoomInfo();
      break;
    case "state":
      if (e.state === "listening" || e.state === "thinking" || e.state === "speaking") setState(e.state);
      break;
    case "turn_committed": {
      const seconds = (Number(e.end_ms) - Number(e.start_ms)) / 1000;
      const li = addItem("user", "You");
      part(li, "text").textContent = e.kind === "text" ? "(typed)" : `spoke for ${seconds.toFixed(1)} s`;
      break;
    }
    case "response_started": {
      const li = addItem("agent", e.greeting ? "Agent (greeting)" : "Agent");
      li.dataset.responseId = String(e.response_id);
      replies.set(String(e.response_id), li);
      break;
    }
    case "agent_text": {
      const li = replies.get(String(e.response_id));
      if (li) part(li, "text").textContent += String(e.text);
      break;
    }
    case "response_done": {
      const li = replies.get(String(e.response_id));
      if (!li) break;
      li.dataset.status = String(e.status);
      if (e.status === "interrupted" || e.status === "cancelled") {
        li.classList.add("cut");
        part(li, "meta").prepend(`interrupted after ${(Number(e.played_ms) / 1000).toFixed(1)} s `);
      }
      const text = part(li, "text");
      if (!text.textContent) text.textContent = typeof e.text === "string" && e.text ? e.text : "(no text)";
      break;
    }
    case "latency": {
      ui.latency.textContent = formatLatency(e);
      const li = replies.get(String(e.response_id));
      if (li) {
        li.dataset.latencyMs = String(Math.round(Number(e.total_ms)));
        part(li, "meta").append(`answered in ${Math.round(Number(e.total_ms))} ms`);
      }
      break;
    }
    case "error":
      showError(`${e.fatal ? "Call error" : "Warning"}: ${String(e.message)}`);
      break;
  }
}

// ------------------------------------------------------------------ meters
function startMeters(): void {
  audioCtx ??= new AudioContext();
  void audioCtx.resume();
  meters ??= { mic: new LevelMeter(audioCtx, ui.micMeter), agent: new LevelMeter(audioCtx, ui.agentMeter) };
  if (mic) meters.mic.attach(mic);
  window.clearInterval(meterTimer);
  meterTimer = window.setInterval(() => {
    meters?.mic.update();
    meters?.agent.update();
  }, 50);
}

function stopMeters(): void {
  window.clearInterval(meterTimer);
  meters?.mic.detach();
  meters?.agent.detach();
}

// ------------------------------------------------------------------ call
function accessKey(): string | null {
  const key = ui.key.value.trim();
  if (key) sessionStorage.setItem("sg2-access-key", key);
  return key || null;
}

class Abandoned extends Error {}

async function startCall(): Promise<void> {
  const mine = ++attempt;
  const live = () => {
    if (mine !== attempt) throw new Abandoned();
  };
  showError(null);
  setCallButton(true);
  setState("connecting");
  try {
    const key = accessKey();
    const inRoom = mode() === "room";
    const config = inRoom ? null : await fetchDirectConfig(key);
    const rooms = inRoom ? await fetchRoomConfig(key) : null;
    live();
    if (inRoom && !rooms) throw new Error("This server no longer offers LiveKit rooms.");
    const auth = config ?? rooms!;
    if (auth.auth_required && !auth.authorized) {
      ui.keyRow.hidden = false;
      throw new SignallingError(401, "unauthorized", "This server needs an access key: enter it above.");
    }
    if (!navigator.mediaDevices?.getUserMedia)
      throw new Error("This page needs a secure context (HTTPS or localhost) to use the microphone.");
    try {
      mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
    } catch (err) {
      throw new Error(micErrorMessage(err));
    }
    live();
    startMeters();
    const roomName = ui.roomName.value.trim() || null;
    const conn = inRoom
      ? new (await import("./room")).RoomConnection(rooms!, key, roomName) // loads livekit-client
      : new DirectConnection(config!, key);
    live();
    connection = conn;
    await conn.connect(mic.getAudioTracks()[0], {
      onRemoteStream(stream) {
        ui.audio.srcObject = stream;
        void ui.audio.play().catch(() => showError("Press anywhere on the page to hear the agent."));
        meters?.agent.attach(stream);
      },
      onEvent: onAgentEvent,
      onClosed(reason) {
        if (mine === attempt) endCall(reason);
      },
    });
    if (mine !== attempt) void conn.hangup(); // abandoned while the offer was being answered
  } catch (err) {
    if (err instanceof Abandoned) {
      mic?.getTracks().forEach((t) => t.stop());
      return;
    }
    const message =
      err instanceof SignallingError
        ? err.status === 503
          ? `The server is busy: ${err.message}`
          : err.message
        : err instanceof Error
          ? err.message
          : String(err);
    showError(message);
    endCall(null);
    setState("idle");
  }
}

function endCall(reason: string | null): void {
  connection = null;
  roomLabel = floorLabel = "";
  showRoomInfo();
  mic?.getTracks().forEach((t) => t.stop());
  mic = null;
  stopMeters();
  ui.audio.srcObject = null;
  setCallButton(false);
  if (reason !== null) setState("ended", reason);
}

ui.call.addEventListener("click", () => {
  if (inCall) {
    const conn = connection;
    if (conn) void conn.hangup();
    else {
      attempt++; // still connecting: abandon the attempt
      endCall("you hung up");
    }
  } else {
    void startCall();
  }
});
ui.mute.addEventListener("click", () => setMuted(ui.mute.getAttribute("aria-pressed") !== "true"));
document.addEventListener("click", () => {
  if (ui.audio.srcObject && ui.audio.paused) void ui.audio.play();
});

// Show the key field up front when the server needs one; offer LiveKit rooms when it has them
// (?room=NAME in the address opens that room: how people share a multi-person call).
ui.key.value = sessionStorage.getItem("sg2-access-key") ?? "";
fetchDirectConfig(null)
  .then((config) => {
    ui.keyRow.hidden = !config.auth_required;
  })
  .catch(() => showError("The server is not reachable."));
fetchRoomConfig(null)
  .then((config) => {
    roomConfig = config;
    ui.modeRow.hidden = !config;
    const wanted = new URLSearchParams(window.location.search).get("room");
    if (config && wanted !== null) {
      ui.roomName.value = wanted;
      setMode("room");
    } else setMode("direct");
  })
  .catch(() => setMode("direct"));
document.querySelectorAll<HTMLInputElement>('input[name="mode"]').forEach((radio) =>
  radio.addEventListener("change", () => setMode(mode())),
);
setState("idle");
