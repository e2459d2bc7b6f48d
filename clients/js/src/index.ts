// @rtbroadcast/client: the reference client of rtbroadcast's wire protocol (docs/clients/javascript.md).

export {
  Client,
  ClientError,
  Subscription,
  SubscriptionError,
  type PresenceUpdate,
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
export {
  FrameError,
  decodeFrame,
  decodeFrameV2,
  encodePositions,
  type DecodedV2,
  type ErrorFrame,
  type Pong,
  type PresenceChange,
  type PresenceMember,
  type PresenceSnapshot,
  type ProtocolFrame,
  type ProtocolFrameV2,
  type ResyncRequired,
  type Subscribed,
  type Unsubscribed,
  type Welcome,
  type WelcomeV2,
  type WireEvent,
} from "./frames.js";
export {
  sseUrlFor,
  type EventSourceConstructor,
  type EventSourceLike,
  type TransportKind,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./transport.js";

/** The wire protocol version a client speaks by default (`protocol` option). */
export const PROTOCOL_VERSION = 1;
/** The wire protocol versions this client speaks. */
export const PROTOCOL_VERSIONS: readonly number[] = [1, 2];
