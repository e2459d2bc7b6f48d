// Server -> client frames of wire protocol 1 (docs/reference/protocol.md), decoded from JSON text.

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
}

/** The shape every application event has on the wire. */
export interface WireEvent {
  readonly type: string;
  readonly seq: number;
}

export type ProtocolFrame = Welcome | ResyncRequired | Pong | ErrorFrame;

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

function need(obj: Record<string, unknown>, field: string, ok: boolean): void {
  if (!ok) throw new FrameError(`'${String(obj["type"])}' frame has a missing or invalid '${field}'`);
}
