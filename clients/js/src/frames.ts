// Server -> client frames of wire protocols 1 and 2 (docs/reference/protocol.md), decoded from JSON text.

/** The first frame on every connection: where the client stands in the channel's stream. */
export interface Welcome {
  readonly type: "welcome";
  readonly channel: string;
  readonly epoch: string;
  readonly seq: number;
  /** Seconds. */
  readonly heartbeat_interval: number;
  readonly resumed: boolean;
  readonly protocol: number;
}

/** The missed events cannot be replayed: reload the state, then continue after `seq` in `epoch`. */
export interface ResyncRequired {
  readonly type: "resync_required";
  readonly reason: string;
  readonly epoch: string;
  readonly seq: number;
  /** Protocol 2: the channel it is about. */
  readonly channel?: string;
}

/** Protocol 2's first frame: the connection, without a channel (the subscriptions follow). */
export interface WelcomeV2 {
  readonly type: "welcome";
  readonly protocol: 2;
  /** Seconds. */
  readonly heartbeat_interval: number;
  /** The server's opaque id of this connection (the `client` of its presence members). */
  readonly connection: string;
}

/** One member of a channel's presence: a subscription, with what the service says about it. */
export interface PresenceMember {
  /** The subscribing connection's id (the `connection` of its welcome). */
  readonly client: string;
  /** The connection's identity (user or device id) as the service authenticated it, or `null`. */
  readonly identity: string | null;
  readonly info: { readonly [key: string]: unknown };
}

/** Who is subscribed to a channel; `members` holds at most the server's snapshot cap, in join order. */
export interface PresenceSnapshot {
  readonly count: number;
  readonly members: readonly PresenceMember[];
  /** True when `members` holds fewer than `count` (the cap was reached). */
  readonly truncated: boolean;
}

/** Protocol 2: a subscription is made (`id` null: the server made it). */
export interface Subscribed {
  readonly type: "subscribed";
  readonly id: string | null;
  readonly channel: string;
  readonly epoch: string;
  readonly seq: number;
  readonly resumed: boolean;
  readonly presence?: PresenceSnapshot;
}

/** Protocol 2: a subscription ended (`reason` `client`: asked; `server`: the service ended it). */
export interface Unsubscribed {
  readonly type: "unsubscribed";
  readonly id: string | null;
  readonly channel: string;
  readonly reason: string;
}

/** Protocol 2: a member joined or left a channel's presence. */
export interface PresenceChange {
  readonly type: "presence_join" | "presence_leave";
  readonly channel: string;
  readonly member: PresenceMember;
}

/** The answer to a `ping`. */
export interface Pong {
  readonly type: "pong";
  readonly timestamp: string;
}

/** The server rejected a client frame; the connection stays open. */
export interface ErrorFrame {
  readonly type: "error";
  readonly code: string;
  readonly message: string;
  /** Protocol 2: the request it answers (`null`: none could be read, or a server-side subscription). */
  readonly id?: string | null;
  /** Protocol 2: the channel it is about, when there is one. */
  readonly channel?: string | null;
}

/** The shape every application event has on the wire. */
export interface WireEvent {
  readonly type: string;
  readonly seq: number;
}

export type ProtocolFrame = Welcome | ResyncRequired | Pong | ErrorFrame;

/** Every protocol-2 frame but `event`. */
export type ProtocolFrameV2 = WelcomeV2 | Subscribed | Unsubscribed | ResyncRequired | PresenceChange | Pong | ErrorFrame;

/** What {@link decodeFrameV2} returns: a frame, one channel's event, or `null` for a frame type it does not know. */
export type DecodedV2 = { frame: ProtocolFrameV2 } | { channel: string; event: WireEvent } | null;

/** A frame that is not what protocol 1 allows. */
export class FrameError extends Error {
  override readonly name = "FrameError";
}

const isInt = (value: unknown): value is number =>
  typeof value === "number" && Number.isSafeInteger(value) && value >= 0;

/**
 * Decode one text frame: a protocol frame (checked field by field) or an application event (every
 * field kept, `seq` checked).
 *
 * @throws FrameError when the text is not a JSON object with a string `type`, or a known frame lacks a
 *   field, or an event has no non-negative integer `seq`.
 */
export function decodeFrame(text: string): { frame: ProtocolFrame } | { event: WireEvent } {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new FrameError("frame is not valid JSON");
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new FrameError("frame is not a JSON object");
  }
  const obj = value as Record<string, unknown>;
  const type = obj["type"];
  if (typeof type !== "string") throw new FrameError("frame has no string 'type'");
  switch (type) {
    case "welcome":
      need(obj, "channel", typeof obj["channel"] === "string");
      need(obj, "epoch", typeof obj["epoch"] === "string");
      need(obj, "seq", isInt(obj["seq"]));
      need(obj, "heartbeat_interval", typeof obj["heartbeat_interval"] === "number");
      need(obj, "resumed", typeof obj["resumed"] === "boolean");
      return { frame: obj as unknown as Welcome };
    case "resync_required":
      need(obj, "reason", typeof obj["reason"] === "string");
      need(obj, "epoch", typeof obj["epoch"] === "string");
      need(obj, "seq", isInt(obj["seq"]));
      return { frame: obj as unknown as ResyncRequired };
    case "pong":
      return { frame: obj as unknown as Pong };
    case "error":
      return { frame: { type: "error", code: String(obj["code"]), message: String(obj["message"]) } };
    default:
      need(obj, "seq", isInt(obj["seq"]));
      return { event: obj as unknown as WireEvent };
  }
}

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value);

function parseObject(text: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new FrameError("frame is not valid JSON");
  }
  if (!isObject(value)) throw new FrameError("frame is not a JSON object");
  if (typeof value["type"] !== "string") throw new FrameError("frame has no string 'type'");
  return value;
}

function checkMember(obj: Record<string, unknown>, value: unknown): PresenceMember {
  need(obj, "member", isObject(value) && typeof value["client"] === "string");
  const member = value as Record<string, unknown>;
  const identity = member["identity"];
  need(obj, "member", identity === null || identity === undefined || typeof identity === "string");
  const info = isObject(member["info"]) ? member["info"] : {};
  return { client: member["client"] as string, identity: (identity as string | null | undefined) ?? null, info };
}

/**
 * Decode one text frame of protocol 2: a protocol frame (checked field by field), a channel's event
 * (`{"type":"event","channel":C,"event":{...}}`, unwrapped), or `null` for a frame type this client does
 * not know (a later server may send more; they are ignored).
 *
 * @throws FrameError when the text is not a JSON object with a string `type`, or a known frame lacks a field.
 */
export function decodeFrameV2(text: string): DecodedV2 {
  const obj = parseObject(text);
  const type = obj["type"] as string;
  const optionalString = (field: string): void => {
    const value = obj[field];
    need(obj, field, value === null || value === undefined || typeof value === "string");
  };
  switch (type) {
    case "event": {
      need(obj, "channel", typeof obj["channel"] === "string");
      const event = obj["event"];
      need(obj, "event", isObject(event) && typeof event["type"] === "string" && isInt(event["seq"]));
      return { channel: obj["channel"] as string, event: event as unknown as WireEvent };
    }
    case "welcome":
      need(obj, "heartbeat_interval", typeof obj["heartbeat_interval"] === "number");
      need(obj, "connection", typeof obj["connection"] === "string");
      return { frame: obj as unknown as WelcomeV2 };
    case "subscribed": {
      optionalString("id");
      need(obj, "channel", typeof obj["channel"] === "string");
      need(obj, "epoch", typeof obj["epoch"] === "string");
      need(obj, "seq", isInt(obj["seq"]));
      need(obj, "resumed", typeof obj["resumed"] === "boolean");
      const presence = obj["presence"];
      if (presence !== undefined && presence !== null) {
        need(obj, "presence", isObject(presence) && isInt(presence["count"]) && Array.isArray(presence["members"]));
        const snapshot = presence as Record<string, unknown>;
        const members = (snapshot["members"] as unknown[]).map((member) => checkMember(obj, member));
        return {
          frame: {
            ...(obj as unknown as Subscribed),
            id: (obj["id"] as string | null | undefined) ?? null,
            presence: { count: snapshot["count"] as number, members, truncated: snapshot["truncated"] === true },
          },
        };
      }
      const { presence: _absent, ...rest } = obj;
      return { frame: { ...(rest as unknown as Subscribed), id: (obj["id"] as string | null | undefined) ?? null } };
    }
    case "unsubscribed":
      optionalString("id");
      need(obj, "channel", typeof obj["channel"] === "string");
      return {
        frame: {
          type: "unsubscribed",
          id: (obj["id"] as string | null | undefined) ?? null,
          channel: obj["channel"] as string,
          reason: typeof obj["reason"] === "string" ? obj["reason"] : "server",
        },
      };
    case "resync_required":
      need(obj, "channel", typeof obj["channel"] === "string");
      need(obj, "reason", typeof obj["reason"] === "string");
      need(obj, "epoch", typeof obj["epoch"] === "string");
      need(obj, "seq", isInt(obj["seq"]));
      return { frame: obj as unknown as ResyncRequired };
    case "presence_join":
    case "presence_leave":
      need(obj, "channel", typeof obj["channel"] === "string");
      return { frame: { type, channel: obj["channel"] as string, member: checkMember(obj, obj["member"]) } };
    case "pong":
      return { frame: obj as unknown as Pong };
    case "error":
      optionalString("id");
      optionalString("channel");
      return {
        frame: {
          type: "error",
          code: String(obj["code"]),
          message: String(obj["message"]),
          id: (obj["id"] as string | null | undefined) ?? null,
          channel: (obj["channel"] as string | null | undefined) ?? null,
        },
      };
    default:
      return null;
  }
}

/** Encode `{channel: position}` as protocol 2's `resume` token: base64url (unpadded) of `{"channel":["epoch",seq]}`. */
export function encodePositions(positions: ReadonlyMap<string, { readonly epoch: string; readonly seq: number }>): string {
  const obj: Record<string, [string, number]> = {};
  for (const [channel, position] of positions) obj[channel] = [position.epoch, position.seq];
  const bytes = new TextEncoder().encode(JSON.stringify(obj));
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

function need(obj: Record<string, unknown>, field: string, ok: boolean): void {
  if (!ok) throw new FrameError(`'${String(obj["type"])}' frame has a missing or invalid '${field}'`);
}
