// How the page reaches the agent. The UI only sees `CallConnection`, so a LiveKit room mode can be
// added as a second implementation (join a room, publish the mic, subscribe to the agent's track,
// read the same JSON events from data packets) without touching main.ts.

/** One JSON message from the agent (see agent/direct/protocol.py for the list). */
export interface AgentEvent {
  type: string;
  [field: string]: unknown;
}

export interface ConnectionHandlers {
  /** The agent's audio is available. */
  onRemoteStream(stream: MediaStream): void;
  onEvent(event: AgentEvent): void;
  /** The call is over (by either side, or the network); called once. */
  onClosed(reason: string): void;
}

export interface CallConnection {
  connect(mic: MediaStreamTrack, handlers: ConnectionHandlers): Promise<void>;
  /** Send a JSON message to the agent (`interrupt`, `text`, `ping`). */
  send(message: AgentEvent): void;
  hangup(): Promise<void>;
}

export class SignallingError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export interface DirectConfig {
  auth_required: boolean;
  authorized: boolean;
  calls_endpoint: string;
  ice_servers: RTCIceServer[];
}

export function authHeaders(key: string | null): Record<string, string> {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export async function errorOf(resp: Response): Promise<SignallingError> {
  let code = "http_" + resp.status;
  let message = resp.statusText || "request failed";
  try {
    const body = await resp.json();
    code = body?.error?.code ?? code;
    message = body?.error?.message ?? message;
  } catch {
    /* not JSON */
  }
  return new SignallingError(resp.status, code, message);
}

export async function fetchDirectConfig(key: string | null): Promise<DirectConfig> {
  const resp = await fetch("/v1/webrtc/config", { headers: authHeaders(key), cache: "no-store" });
  if (!resp.ok) throw await errorOf(resp);
  return (await resp.json()) as DirectConfig;
}

/** Gathering on a LAN is instant; with STUN/TURN it may take a while: send what we have by then. */
function gatheringDone(pc: RTCPeerConnection, timeoutMs: number): Promise<void> {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/** Browser ⇄ `sg2 serve` directly: WHIP-style signalling, one peer connection, no SFU. */
export class DirectConnection implements CallConnection {
  private pc: RTCPeerConnection | null = null;
  private channel: RTCDataChannel | null = null;
  private location: string | null = null;
  private closed = false;
  private handlers: ConnectionHandlers | null = null;
  private readonly onPageHide = () => this.deleteResource(true);

  constructor(
    private readonly config: DirectConfig,
    private readonly key: string | null,
  ) {}

  async connect(mic: MediaStreamTrack, handlers: ConnectionHandlers): Promise<void> {
    this.handlers = handlers;
    const pc = new RTCPeerConnection({ iceServers: this.config.ice_servers, bundlePolicy: "max-bundle" });
    this.pc = pc;
    pc.addTransceiver(mic, { direction: "sendrecv", streams: [new MediaStream([mic])] });
    const channel = pc.createDataChannel("events", { ordered: true });
    this.channel = channel;
    channel.onmessage = (msg) => {
      let event: AgentEvent;
      try {
        event = JSON.parse(String(msg.data));
      } catch {
        return;
      }
      handlers.onEvent(event);
      if (event.type === "call_ended") this.finish(String(event.reason ?? "ended by the server"));
    };
    pc.ontrack = (ev) => handlers.onRemoteStream(ev.streams[0] ?? new MediaStream([ev.track]));
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") this.finish("the connection failed (network)");
      else if (pc.connectionState === "closed") this.finish("the connection closed");
    };

    await pc.setLocalDescription(await pc.createOffer());
    await gatheringDone(pc, 3000);
    if (this.closed) return; // hung up while gathering
    const resp = await fetch(this.config.calls_endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/sdp", ...authHeaders(this.key) },
      body: pc.localDescription!.sdp,
    });
    if (resp.status !== 201) {
      const err = await errorOf(resp);
      this.teardown();
      throw err;
    }
    this.location = resp.headers.get("Location");
    if (this.closed) {
      await this.deleteResource(false); // hung up while the offer was being answered
      return;
    }
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    window.addEventListener("pagehide", this.onPageHide);
  }

  send(message: AgentEvent): void {
    if (this.channel?.readyState === "open") this.channel.send(JSON.stringify(message));
  }

  async hangup(): Promise<void> {
    await this.deleteResource(false);
    this.finish("you hung up");
  }

  private async deleteResource(keepalive: boolean): Promise<void> {
    const url = this.location;
    this.location = null;
    if (!url) return;
    try {
      await fetch(url, { method: "DELETE", headers: authHeaders(this.key), keepalive });
    } catch {
      /* the server cleans up on its own (media timeout) */
    }
  }

  private finish(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.teardown();
    this.handlers?.onClosed(reason);
  }

  private teardown(): void {
    window.removeEventListener("pagehide", this.onPageHide);
    this.channel?.close();
    this.pc?.close();
    this.channel = null;
    this.pc = null;
  }
}
