// LiveKit room mode: join a room with a token from `sg2 serve` (POST /v1/livekit/token), publish the
// microphone, play the agent, and turn what the agent publishes into the page's events:
//   lk.agent.state attribute  -> {type: "state"}            (listening / thinking / speaking)
//   lk.transcription streams  -> response_started / agent_text / response_done
//   sg2.floor attribute       -> {type: "floor"}            (whom the agent listens to)
//   sg2.error data packets    -> {type: "error", fatal}     (the call failed on the server side)
// The LiveKit API secret never reaches the page: it only ever sees a short-lived, room-scoped token.

import {
  type Participant,
  type RemoteParticipant,
  type RemoteTrack,
  Room,
  RoomEvent,
  type TextStreamReader,
  Track,
} from "livekit-client";
import { type AgentEvent, authHeaders, type CallConnection, type ConnectionHandlers, errorOf } from "./connection";
import type { RoomConfig, RoomToken } from "./roomconfig";

const AGENT_STATE = "lk.agent.state";
const FLOOR = "sg2.floor";
const ERROR_TOPIC = "sg2.error";
const TRANSCRIPTION = "lk.transcription";

export async function fetchRoomToken(
  config: RoomConfig,
  key: string | null,
  room: string | null,
): Promise<RoomToken> {
  const body: Record<string, string> = {};
  if (room) body.room = room;
  const resp = await fetch(config.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders(key) },
    body: JSON.stringify(body),
    cache: "no-store",
  });
  if (!resp.ok) throw await errorOf(resp);
  return (await resp.json()) as RoomToken;
}

function isAgent(p: Participant): boolean {
  return p.isAgent || AGENT_STATE in p.attributes;
}

/** Browser ⇄ LiveKit room ⇄ `sg2 agent` worker ⇄ `sg2 serve`. */
export class RoomConnection implements CallConnection {
  private room: Room | null = null;
  private closed = false;
  private handlers: ConnectionHandlers | null = null;
  private agent: string | null = null;
  private floor: string | null = null;
  private state: string | null = null;
  private heard = false; // a human spoke (LiveKit's active speakers) since the agent last answered
  private readonly segments = new Set<string>();
  token: RoomToken | null = null;

  constructor(
    private readonly config: RoomConfig,
    private readonly key: string | null,
    private readonly roomName: string | null,
  ) {}

  async connect(mic: MediaStreamTrack, handlers: ConnectionHandlers): Promise<void> {
    this.handlers = handlers;
    const token = await fetchRoomToken(this.config, this.key, this.roomName);
    this.token = token;
    if (this.closed) return; // hung up while the token was being minted
    const room = new Room({ adaptiveStream: false, dynacast: false, disconnectOnPageLeave: true });
    this.room = room;
    room
      .on(RoomEvent.ParticipantConnected, (p: RemoteParticipant) => this.seen(p))
      .on(RoomEvent.ParticipantAttributesChanged, (changed: Record<string, string>, p: Participant) => {
        if (isAgent(p)) {
          this.seen(p as RemoteParticipant);
          this.attributes(changed);
        }
      })
      .on(RoomEvent.TrackSubscribed, (track: RemoteTrack, _pub, p: RemoteParticipant) => {
        if (track.kind === Track.Kind.Audio && isAgent(p)) {
          this.seen(p);
          handlers.onRemoteStream(new MediaStream([track.mediaStreamTrack]));
        }
      })
      .on(RoomEvent.ActiveSpeakersChanged, (speakers: Participant[]) => {
        if (speakers.some((p) => !isAgent(p))) this.heard = true;
      })
      .on(RoomEvent.ParticipantDisconnected, (p: RemoteParticipant) => {
        if (p.identity === this.agent) this.finish("the agent left the room");
      })
      .on(RoomEvent.DataReceived, (payload: Uint8Array, _p, _kind, topic?: string) => {
        if (topic !== ERROR_TOPIC) return;
        let message = "the call failed";
        try {
          message = String(JSON.parse(new TextDecoder().decode(payload)).message ?? message);
        } catch {
          /* not JSON */
        }
        handlers.onEvent({ type: "error", fatal: true, message });
      })
      .on(RoomEvent.Disconnected, (reason?: unknown) =>
        this.finish(reason === undefined ? "disconnected" : `disconnected (${String(reason)})`),
      );
    room.registerTextStreamHandler(TRANSCRIPTION, (reader, from) => {
      void this.transcription(reader, from.identity);
    });

    await room.connect(token.url, token.token, { autoSubscribe: true });
    if (this.closed) {
      await room.disconnect();
      return;
    }
    await room.localParticipant.publishTrack(mic, { source: Track.Source.Microphone });
    handlers.onEvent({ type: "room", room: token.room, identity: token.identity });
    for (const p of room.remoteParticipants.values()) {
      if (isAgent(p)) {
        this.seen(p);
        this.attributes(p.attributes);
      }
    }
  }

  private seen(p: RemoteParticipant): void {
    if (!isAgent(p) || this.agent === p.identity) return;
    this.agent = p.identity;
    this.handlers?.onEvent({ type: "agent_joined", identity: p.identity });
  }

  private attributes(changed: Record<string, string>): void {
    const floor = changed[FLOOR];
    if (floor) {
      this.floor = floor;
      this.handlers?.onEvent({ type: "floor", identity: floor, you: floor === this.token?.identity });
    }
    const state = changed[AGENT_STATE];
    if (state) {
      // listening -> thinking/speaking after someone spoke: the engine took the floor holder's turn
      // (no transcript of it exists, so the page shows who spoke)
      if ((state === "thinking" || state === "speaking") && this.state === "listening" && this.heard && this.floor) {
        this.heard = false;
        this.handlers?.onEvent({ type: "user_turn", identity: this.floor, you: this.floor === this.token?.identity });
      }
      this.state = state;
      this.handlers?.onEvent({ type: "state", state });
    }
  }

  private async transcription(reader: TextStreamReader, identity: string): Promise<void> {
    const room = this.room;
    const from = room?.remoteParticipants.get(identity);
    if (!from || !isAgent(from)) return; // only the agent's words (no transcript of the humans exists)
    const id = reader.info.attributes?.["lk.segment_id"] ?? reader.info.id;
    if (!this.segments.has(id)) {
      this.segments.add(id);
      this.handlers?.onEvent({ type: "response_started", response_id: id });
    }
    try {
      for await (const chunk of reader) this.handlers?.onEvent({ type: "agent_text", response_id: id, text: chunk });
    } catch {
      /* the stream was cut (agent left); what arrived stays on screen */
    }
    this.handlers?.onEvent({ type: "response_done", response_id: id, status: "completed" });
  }

  send(message: AgentEvent): void {
    // typed turns reach the agent as LiveKit chat (the framework's lk.chat text input)
    if (message.type === "text" && typeof message.text === "string" && this.room)
      void this.room.localParticipant.sendText(message.text, { topic: "lk.chat" });
  }

  async hangup(): Promise<void> {
    await this.room?.disconnect();
    this.finish("you left the room");
  }

  private finish(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    const room = this.room;
    this.room = null;
    room?.unregisterTextStreamHandler(TRANSCRIPTION);
    void room?.disconnect();
    this.handlers?.onClosed(reason);
  }
}
