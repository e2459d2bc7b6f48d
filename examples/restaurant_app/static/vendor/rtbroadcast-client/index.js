// @rtbroadcast/client: the reference client of rtbroadcast's wire protocol (docs/clients/javascript.md).
export { Client, ClientError, Subscription, } from "./client.js";
export { Cursor, backoffCeiling, backoffDelay, checkPosition, closeAction, } from "./cursor.js";
export { Emitter } from "./emitter.js";
export { FrameError, decodeFrame } from "./frames.js";
export { sseUrlFor, } from "./transport.js";
/** The wire protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;
