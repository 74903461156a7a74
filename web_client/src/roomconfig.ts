// What the page needs to offer LiveKit room calls, without loading the LiveKit client (room.ts is
// imported only when a room call starts).

import { authHeaders, errorOf } from "./connection";

export interface RoomConfig {
  available: boolean;
  auth_required: boolean;
  authorized: boolean;
  token_endpoint: string;
  agent_name: string | null;
  room_prefix: string;
  allow_room_choice: boolean;
}

export interface RoomToken {
  url: string;
  token: string;
  room: string;
  identity: string;
  agent_name: string | null;
  expires_at: string;
  ttl_s: number;
}

/** The server's room-call settings, or null when it does not offer LiveKit rooms. */
export async function fetchRoomConfig(key: string | null): Promise<RoomConfig | null> {
  const resp = await fetch("/v1/livekit/config", { headers: authHeaders(key), cache: "no-store" });
  if (resp.status === 404) return null;
  if (!resp.ok) throw await errorOf(resp);
  return (await resp.json()) as RoomConfig;
}
