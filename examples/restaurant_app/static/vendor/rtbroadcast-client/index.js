// @rtbroadcast/client: the reference client of rtbroadcast's wire protocol (docs/clients/javascript.md).
export { Client, ClientError, Subscription, SubscriptionError, } from "./client.js";
export { Cursor, backoffCeiling, backoffDelay, checkPosition, closeAction, } from "./cursor.js";
export { Emitter } from "./emitter.js";
export { FrameError, decodeFrame, decodeFrameV2, encodePositions, } from "./frames.js";
export { sseUrlFor, } from "./transport.js";
/** The wire protocol version a client speaks by default (`protocol` option). */
export const PROTOCOL_VERSION = 1;
/** The wire protocol versions this client speaks. */
export const PROTOCOL_VERSIONS = [1, 2];
