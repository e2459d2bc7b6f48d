// @rtbroadcast/client: the reference client of rtbroadcast's wire protocol (docs/clients/javascript.md).

export {
  Client,
  ClientError,
  Subscription,
  type AnyEvent,
  type EventShape,
  type ClientOptions,
  type ClientState,
  type ClientStats,
  type DisconnectInfo,
  type Received,
  type ResyncInfo,
  type SubscriptionOptions,
  type SubscriptionState,
  type TokenRequest,
} from "./client.js";
export {
  Cursor,
  backoffCeiling,
  backoffDelay,
  checkPosition,
  closeAction,
  type BackoffOptions,
  type CloseAction,
  type Position,
  type Verdict,
} from "./cursor.js";
export { Emitter, type Unsubscribe } from "./emitter.js";
export { FrameError, decodeFrame, type ErrorFrame, type Pong, type ProtocolFrame, type ResyncRequired, type Welcome, type WireEvent } from "./frames.js";
export {
  sseUrlFor,
  type EventSourceConstructor,
  type EventSourceLike,
  type TransportKind,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./transport.js";

/** The wire protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;
