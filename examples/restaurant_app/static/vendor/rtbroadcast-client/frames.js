// Server -> client frames of wire protocol 1 (docs/reference/protocol.md), decoded from JSON text.
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
function need(obj, field, ok) {
    if (!ok)
        throw new FrameError(`'${String(obj["type"])}' frame has a missing or invalid '${field}'`);
}
