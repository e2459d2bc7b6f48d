// Server -> client frames of wire protocols 1 and 2 (docs/reference/protocol.md), decoded from JSON text.
/** A frame that is not what protocol 1 allows. */
export class FrameError extends Error {
    name = "FrameError";
}
const isInt = (value) => typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
/**
 * Decode one text frame: a protocol frame (checked field by field) or an application event (every
 * field kept, `seq` checked).
 *
 * @throws FrameError when the text is not a JSON object with a string `type`, or a known frame lacks a
 *   field, or an event has no non-negative integer `seq`.
 */
export function decodeFrame(text) {
    let value;
    try {
        value = JSON.parse(text);
    }
    catch {
        throw new FrameError("frame is not valid JSON");
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
        throw new FrameError("frame is not a JSON object");
    }
    const obj = value;
    const type = obj["type"];
    if (typeof type !== "string")
        throw new FrameError("frame has no string 'type'");
    switch (type) {
        case "welcome":
            need(obj, "channel", typeof obj["channel"] === "string");
            need(obj, "epoch", typeof obj["epoch"] === "string");
            need(obj, "seq", isInt(obj["seq"]));
            need(obj, "heartbeat_interval", typeof obj["heartbeat_interval"] === "number");
            need(obj, "resumed", typeof obj["resumed"] === "boolean");
            return { frame: obj };
        case "resync_required":
            need(obj, "reason", typeof obj["reason"] === "string");
            need(obj, "epoch", typeof obj["epoch"] === "string");
            need(obj, "seq", isInt(obj["seq"]));
            return { frame: obj };
        case "pong":
            return { frame: obj };
        case "error":
            return { frame: { type: "error", code: String(obj["code"]), message: String(obj["message"]) } };
        default:
            need(obj, "seq", isInt(obj["seq"]));
            return { event: obj };
    }
}
const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);
function parseObject(text) {
    let value;
    try {
        value = JSON.parse(text);
    }
    catch {
        throw new FrameError("frame is not valid JSON");
    }
    if (!isObject(value))
        throw new FrameError("frame is not a JSON object");
    if (typeof value["type"] !== "string")
        throw new FrameError("frame has no string 'type'");
    return value;
}
function checkMember(obj, value) {
    need(obj, "member", isObject(value) && typeof value["client"] === "string");
    const member = value;
    const identity = member["identity"];
    need(obj, "member", identity === null || identity === undefined || typeof identity === "string");
    const info = isObject(member["info"]) ? member["info"] : {};
    return { client: member["client"], identity: identity ?? null, info };
}
/**
 * Decode one text frame of protocol 2: a protocol frame (checked field by field), a channel's event
 * (`{"type":"event","channel":C,"event":{...}}`, unwrapped), or `null` for a frame type this client does
 * not know (a later server may send more; they are ignored).
 *
 * @throws FrameError when the text is not a JSON object with a string `type`, or a known frame lacks a field.
 */
export function decodeFrameV2(text) {
    const obj = parseObject(text);
    const type = obj["type"];
    const optionalString = (field) => {
        const value = obj[field];
        need(obj, field, value === null || value === undefined || typeof value === "string");
    };
    switch (type) {
        case "event": {
            need(obj, "channel", typeof obj["channel"] === "string");
            const event = obj["event"];
            need(obj, "event", isObject(event) && typeof event["type"] === "string" && isInt(event["seq"]));
            return { channel: obj["channel"], event: event };
        }
        case "welcome":
            need(obj, "heartbeat_interval", typeof obj["heartbeat_interval"] === "number");
            need(obj, "connection", typeof obj["connection"] === "string");
            return { frame: obj };
        case "subscribed": {
            optionalString("id");
            need(obj, "channel", typeof obj["channel"] === "string");
            need(obj, "epoch", typeof obj["epoch"] === "string");
            need(obj, "seq", isInt(obj["seq"]));
            need(obj, "resumed", typeof obj["resumed"] === "boolean");
            const presence = obj["presence"];
            if (presence !== undefined && presence !== null) {
                need(obj, "presence", isObject(presence) && isInt(presence["count"]) && Array.isArray(presence["members"]));
                const snapshot = presence;
                const members = snapshot["members"].map((member) => checkMember(obj, member));
                return {
                    frame: {
                        ...obj,
                        id: obj["id"] ?? null,
                        presence: { count: snapshot["count"], members, truncated: snapshot["truncated"] === true },
                    },
                };
            }
            const { presence: _absent, ...rest } = obj;
            return { frame: { ...rest, id: obj["id"] ?? null } };
        }
        case "unsubscribed":
            optionalString("id");
            need(obj, "channel", typeof obj["channel"] === "string");
            return {
                frame: {
                    type: "unsubscribed",
                    id: obj["id"] ?? null,
                    channel: obj["channel"],
                    reason: typeof obj["reason"] === "string" ? obj["reason"] : "server",
                },
            };
        case "resync_required":
            need(obj, "channel", typeof obj["channel"] === "string");
            need(obj, "reason", typeof obj["reason"] === "string");
            need(obj, "epoch", typeof obj["epoch"] === "string");
            need(obj, "seq", isInt(obj["seq"]));
            return { frame: obj };
        case "presence_join":
        case "presence_leave":
            need(obj, "channel", typeof obj["channel"] === "string");
            return { frame: { type, channel: obj["channel"], member: checkMember(obj, obj["member"]) } };
        case "pong":
            return { frame: obj };
        case "error":
            optionalString("id");
            optionalString("channel");
            return {
                frame: {
                    type: "error",
                    code: String(obj["code"]),
                    message: String(obj["message"]),
                    id: obj["id"] ?? null,
                    channel: obj["channel"] ?? null,
                },
            };
        default:
            return null;
    }
}
/** Encode `{channel: position}` as protocol 2's `resume` token: base64url (unpadded) of `{"channel":["epoch",seq]}`. */
export function encodePositions(positions) {
    const obj = {};
    for (const [channel, position] of positions)
        obj[channel] = [position.epoch, position.seq];
    const bytes = new TextEncoder().encode(JSON.stringify(obj));
    let binary = "";
    for (const byte of bytes)
        binary += String.fromCharCode(byte);
    return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}
function need(obj, field, ok) {
    if (!ok)
        throw new FrameError(`'${String(obj["type"])}' frame has a missing or invalid '${field}'`);
}
