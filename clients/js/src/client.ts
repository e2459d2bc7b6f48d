// The client state machine: one Client owns one connection at a time (WebSocket, or SSE as a fallback)
// and the subscriptions it carries. Protocol 1 carries one channel per connection, named by the URL, so
// a Client has at most one Subscription; protocol 2 (`protocol: 2`) carries several on one connection,
// each with its own position, resync and events, plus the ones the server makes itself.

import { Cursor, backoffDelay, checkPosition, closeAction, type BackoffOptions, type Position } from "./cursor.js";
import { Emitter, type Unsubscribe } from "./emitter.js";
import {
  FrameError,
  decodeFrame,
  decodeFrameV2,
  encodePositions,
  type ErrorFrame,
  type PresenceMember,
  type PresenceSnapshot,
  type ResyncRequired,
  type Subscribed,
  type Welcome,
  type WelcomeV2,
} from "./frames.js";
import {
  ABNORMAL_CLOSURE,
  openEventSource,
  openWebSocket,
  sseUrlFor,
  type EventSourceConstructor,
  type Transport,
  type TransportKind,
  type WebSocketConstructor,
} from "./transport.js";

/** Any application event: a `type` and whatever fields the service declares. */
export interface AnyEvent {
  readonly type: string;
  readonly [field: string]: unknown;
}

/**
 * What an event type parameter must be: an object with a string `type`. Interfaces qualify (such as
 * the ones `scripts/asyncapi-to-ts.mjs` generates), as do object types.
 */
export interface EventShape {
  readonly type: string;
}

/** An event as delivered: the service's fields plus its `seq` in the channel. */
export type Received<E> = E & { readonly seq: number };

/**
 * - `idle`: created, `connect()` not called yet.
 * - `connecting`: opening a connection (or loading the first snapshot, or asking for a token).
 * - `connected`: the server's `welcome` arrived; events flow.
 * - `waiting`: the connection is gone; the next attempt starts after a backoff delay.
 * - `closed`: stopped for good: `close()` was called, or the server refused in a way retrying cannot fix.
 */
export type ClientState = "idle" | "connecting" | "connected" | "waiting" | "closed";

/** Why `getToken` is called. */
export interface TokenRequest {
  /** `connect`: before the first connection (no `token` option); `refused`: the server closed with 4003. */
  readonly reason: "connect" | "refused";
  readonly code?: number;
  readonly message?: string;
}

export interface ClientOptions<E extends EventShape = AnyEvent> {
  /** The stream's WebSocket address with its channel parameters, e.g. `ws://host/realtime?room=lobby`. */
  readonly url: string;
  /**
   * The wire protocol: 1 (default: one channel, named by the URL) or 2 (`?protocol=2`: the subscriptions
   * of `subscribe({channel})` on one connection, plus the server's own).
   */
  readonly protocol?: 1 | 2;
  /**
   * Protocol 2: the options of a subscription the server makes itself (`subscribed` with no request id),
   * such as a `resync` callback that loads the channel's snapshot and an `onEvent`. Without it (or when
   * it returns `undefined`) the subscription starts at the server's position; listen to the client's
   * `subscription` event to follow it.
   */
  readonly serverSubscription?: (channel: string) => Omit<SubscriptionOptions<E>, "channel" | "position"> | undefined;
  /**
   * The Server-Sent Events address of the same stream. Default: `url` with `http(s)` and `/sse` appended
   * to its path (what `broadcast_routes` mounts). `null` turns the fallback off.
   */
  readonly sseUrl?: string | null;
  /** Switch to SSE after this many WebSocket attempts in a row failed before opening (default 2). */
  readonly sseFallbackAfter?: number;
  /** The credential sent as query parameter `tokenParam`. */
  readonly token?: string;
  /** Query parameter that carries the token (default `"token"`). */
  readonly tokenParam?: string;
  /**
   * Returns a credential: before the first connection when `token` is not given, and after a 4003
   * refusal. Returning the same token again, `null` or `undefined` stops the client; a new one is used
   * for the next attempt (after the usual backoff, so a server that refuses every token is not stormed).
   */
  readonly getToken?: (request: TokenRequest) => string | null | undefined | Promise<string | null | undefined>;
  /** The WebSocket constructor; default `globalThis.WebSocket`. */
  readonly WebSocket?: WebSocketConstructor;
  /** The EventSource constructor for the SSE fallback; default `globalThis.EventSource`. */
  readonly EventSource?: EventSourceConstructor;
  /** Reconnect delays in ms: full jitter below a ceiling that starts at 500 and doubles up to 10000. */
  readonly backoff?: BackoffOptions;
  /** A connection that stayed up this long (ms, default 5000) resets the backoff to its first step. */
  readonly stableAfter?: number;
  /** Ping period in ms; default the `heartbeat_interval` of the server's `welcome`. */
  readonly heartbeatInterval?: number;
  /**
   * How long past a ping period (ms, default 10000) the client waits for any frame before it declares the
   * connection dead: silence for `heartbeatInterval + heartbeatTimeout` closes it and reconnects.
   */
  readonly heartbeatTimeout?: number;
  /** An attempt that brings no `welcome` within this many ms (default 10000) is abandoned and retried. */
  readonly connectTimeout?: number;
  /** Retry at once when the browser goes back online or the page becomes visible (default true). */
  readonly retryOnResume?: boolean;
}

/** The state machine's counters, for tests, dashboards and people. */
export interface ClientStats {
  /** Connection attempts started. */
  attempts: number;
  /** `welcome` frames received. */
  welcomes: number;
  /** Welcomes with `resumed: true` (protocol 2: `subscribed` frames with `resumed: true`). */
  resumed: number;
  /** Connections declared dead by the heartbeat. */
  heartbeatTimeouts: number;
}

/** A disconnection, as `disconnect` listeners see it. */
export interface DisconnectInfo {
  /** The WebSocket close code; 1006 when the connection dropped without one (or the heartbeat gave up). */
  readonly code: number;
  readonly reason: string;
  /** Milliseconds until the next attempt; `null` when the client stopped. */
  readonly retryIn: number | null;
  /** Which retry comes next since the last stable connection: 1, 2, ... (0 when the client stopped). */
  readonly retry: number;
}

/** An error the client reports; `code` is the close code when the server refused or ended the stream. */
export class ClientError extends Error {
  override readonly name: string = "ClientError";
  readonly code: number | undefined;
  constructor(message: string, code?: number, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }
}

type ClientEvents<E extends EventShape> = {
  state: [state: ClientState];
  /** The `welcome` frame (protocol 2: its `WelcomeV2`, before the subscriptions are confirmed). */
  connected: [welcome: Welcome | WelcomeV2];
  disconnect: [info: DisconnectInfo];
  error: [error: Error];
  /** Protocol 2: the server subscribed this connection to a channel the client did not ask for. */
  subscription: [subscription: Subscription<E>];
  /** Protocol 2: a subscription ended: `client` (its `unsubscribe()`), `server` (the service ended it). */
  unsubscribed: [subscription: Subscription<E>, reason: string];
};

/**
 * The server refused or ended one subscription (protocol 2): `reason` is the server's error code
 * (`forbidden`, `invalid_channel`, `too_many_subscriptions`, `try_again_later`, `presence_unavailable`, ...).
 */
export class SubscriptionError extends ClientError {
  override readonly name: string = "SubscriptionError";
  readonly reason: string;
  readonly channel: string | null;
  constructor(message: string, reason: string, channel: string | null) {
    super(message);
    this.reason = reason;
    this.channel = channel;
  }
}

/** A change of a channel's presence, as `presence` listeners see it. */
export interface PresenceUpdate {
  /** `snapshot`: a fresh one (each confirmed subscription with `presence: true`); `join` / `leave`: one member. */
  readonly kind: "snapshot" | "join" | "leave";
  readonly member: PresenceMember | null;
  /** The presence after the change. */
  readonly presence: PresenceSnapshot;
}

/** What `resync` receives: why, and the stream position the server is at. */
export interface ResyncInfo {
  /**
   * `initial` (before the first connection, without a `position`); a reason the server sent
   * (`epoch_changed`, `history_trimmed`, `seq_ahead`, `backend_interrupted`, ...); `requested`
   * (`Subscription.resync()`); or `resume_overflow` (two resumes in a row were closed with 4001 before
   * any event arrived: the backlog is larger than the server lets a connection queue).
   */
  readonly reason: string;
  readonly channel: string | null;
  /** The server's position when it sent `resync_required`; `null` for the client's own reasons. */
  readonly epoch: string | null;
  readonly seq: number | null;
}

export interface SubscriptionOptions<E> {
  /** Protocol 1: leave out (the URL names the channel), or give the channel the server must confirm. */
  readonly channel?: string;
  /** Where the application's state stands (a snapshot's `epoch` and `seq`): the stream resumes after it. */
  readonly position?: Position | null;
  /**
   * Reload the application's state (its snapshot) and return the position it reflects. Called before
   * the first connection when no `position` is given, and whenever the server says `resync_required`.
   * Without it the subscription continues from the server's position (the application is still told,
   * through the `resync` event).
   */
  readonly resync?: (info: ResyncInfo) => Position | Promise<Position>;
  /** Apply one event; awaited before the next one, and the position advances once it settles. */
  readonly onEvent?: (event: Received<E>) => unknown;
  /**
   * Protocol 2: ask for the channel's presence (a snapshot with each confirmation, then join and leave
   * frames) where the service has presence on the channel; else a `presence_unavailable` error is reported.
   */
  readonly presence?: boolean;
}

/**
 * `idle` until the first welcome (protocol 2: `subscribed`), `live` while events are applied,
 * `resyncing` while `resync` runs, `closed` after `unsubscribe()`, a refusal, or `client.close()`.
 */
export type SubscriptionState = "idle" | "live" | "resyncing" | "closed";

type SubscriptionEvents<E> = {
  event: [event: Received<E>];
  resync: [info: ResyncInfo];
  position: [position: Position];
  state: [state: SubscriptionState];
  /** Protocol 2: the presence snapshot, or a member that joined or left. */
  presence: [update: PresenceUpdate];
  /** Protocol 2: the server refused the subscription (it is closed then, except `presence_unavailable`). */
  error: [error: SubscriptionError];
};

type QueueItem<E> =
  | { readonly kind: "event"; readonly epoch: string; readonly event: Received<E> }
  | { readonly kind: "resync"; readonly info: ResyncInfo };

/** What a subscription needs from its client. */
interface SubscriptionHost {
  reconnect(reason: string): void;
  report(error: Error): void;
  unsubscribe(subscription: Subscription<never>): void;
}

/** One channel's stream as the application sees it: events in order, each once, and resyncs. */
export class Subscription<E extends EventShape = AnyEvent> extends Emitter<SubscriptionEvents<E>> {
  #channel: string | null;
  #state: SubscriptionState = "idle";
  readonly #cursor: Cursor;
  readonly #options: SubscriptionOptions<E>;
  readonly #host: SubscriptionHost;
  #queue: QueueItem<E>[] = [];
  #running = false;
  /** The event `onEvent` is applying now. */
  #applying: Received<E> | null = null;
  /** The epoch of the events the connection delivers now (its welcome's, then each resync_required's). */
  #streamEpoch: string | null = null;
  #presence: PresenceSnapshot | null = null;
  /** Counters: events applied, duplicates dropped, gaps seen, resyncs run. */
  readonly stats = { applied: 0, duplicates: 0, gaps: 0, resyncs: 0 };
  /** Protocol 2: the server made this subscription (`subscribed` without a request id). */
  readonly serverSide: boolean;
  /** Protocol 2: the confirmation of the current connection arrived. */
  #confirmed = false;
  /**
   * @internal Protocol 2: the server confirmed this channel with no request id (its resolver subscribes
   * the connection to it): the next connection resumes it through the `resume` query parameter.
   */
  resumeInUrl = false;

  /** Use `Client.subscribe`. */
  constructor(host: SubscriptionHost, options: SubscriptionOptions<E>, serverSide = false) {
    super();
    this.#host = host;
    this.#options = options;
    this.#channel = options.channel ?? null;
    this.#cursor = new Cursor(options.position ?? null);
    this.serverSide = serverSide;
  }

  /** Protocol 2: who is subscribed to the channel, when `presence: true` was asked and the channel has it. */
  get presence(): PresenceSnapshot | null {
    return this.#presence;
  }

  /** Whether the subscription asked for presence. */
  get wantsPresence(): boolean {
    return this.#options.presence === true;
  }

  /**
   * Protocol 2: end this subscription (an `unsubscribe` frame when connected). No event is delivered
   * after this call; the client's `unsubscribed` event follows once the server confirmed.
   */
  unsubscribe(): void {
    if (this.#state === "closed") return;
    this.close();
    this.#host.unsubscribe(this as unknown as Subscription<never>);
  }

  /** The channel; known from the options or from the server's welcome. */
  get channel(): string | null {
    return this.#channel;
  }

  get state(): SubscriptionState {
    return this.#state;
  }

  /** The last event applied (or the snapshot's position); `null` before the first welcome. */
  get position(): Position | null {
    return this.#cursor.position;
  }

  /**
   * The events received and not applied yet, in arrival order (the one `onEvent` is applying now
   * first): a backlog to show or to wait for. A copy.
   */
  get pending(): ReadonlyArray<Received<E>> {
    const queued = this.#queue.flatMap((item) => (item.kind === "event" ? [item.event] : []));
    return this.#applying === null ? queued : [this.#applying, ...queued];
  }

  /** Reload the snapshot through the `resync` callback now (for example after applying an event failed). */
  resync(): void {
    this.#push({ kind: "resync", info: { reason: "requested", channel: this.#channel, epoch: null, seq: null } });
  }

  // -- used by Client ------------------------------------------------------------------------------

  /** @internal */
  get needsInitialSnapshot(): boolean {
    return this.#cursor.position === null && this.#options.resync !== undefined;
  }

  /** @internal Load the first snapshot (before the first connection). */
  async loadInitialSnapshot(): Promise<void> {
    const info: ResyncInfo = { reason: "initial", channel: this.#channel, epoch: null, seq: null };
    this.stats.resyncs += 1;
    this.emit("resync", info);
    this.#cursor.reset(checkPosition(await this.#options.resync!(info)));
  }

  /**
   * @internal Give up resuming: load a snapshot (or, without a resync callback, start at the server's
   * current position) before the next connection.
   */
  async restart(reason: string): Promise<void> {
    this.#queue = [];
    const info: ResyncInfo = { reason, channel: this.#channel, epoch: null, seq: null };
    this.stats.resyncs += 1;
    this.emit("resync", info);
    if (this.#options.resync === undefined) {
      this.#cursor.position = null;
      return;
    }
    this.#cursor.reset(checkPosition(await this.#options.resync(info)));
    this.emit("position", this.#cursor.position!);
  }

  /** @internal */
  resumeParams(): Record<string, string> {
    return this.#cursor.resumeParams();
  }

  /** @internal */
  welcome(welcome: Welcome): void {
    if (this.#options.channel !== undefined && welcome.channel !== this.#options.channel) {
      this.#host.report(
        new ClientError(`the server sent channel '${welcome.channel}', the subscription asked for '${this.#options.channel}'`),
      );
    }
    this.#channel = welcome.channel;
    this.#confirm(welcome.epoch, welcome.seq);
  }

  /** @internal Protocol 2: the subscription is confirmed on this connection. */
  subscribed(frame: Subscribed): void {
    const initial = this.#cursor.position === null && this.#options.resync !== undefined;
    this.#confirmed = true;
    this.#confirm(frame.epoch, frame.seq);
    if (initial) {
      // A server-side subscription (or one made without its first snapshot): load it now; the events
      // that follow wait behind it, and those the snapshot holds are dropped.
      this.#push({ kind: "resync", info: { reason: "initial", channel: this.#channel, epoch: null, seq: null } });
    }
    if (frame.presence !== undefined) {
      this.#presence = frame.presence;
      this.emit("presence", { kind: "snapshot", member: null, presence: frame.presence });
    }
  }

  /** @internal Protocol 2: the connection is gone; the next one confirms again. */
  disconnected(): void {
    this.#confirmed = false;
  }

  /** @internal */
  get confirmed(): boolean {
    return this.#confirmed;
  }

  /** @internal Protocol 2: a member joined or left. */
  presenceChanged(kind: "join" | "leave", member: PresenceMember): void {
    const current = this.#presence;
    if (current === null || this.#state === "closed") return;
    let members = current.members;
    if (kind === "join") {
      // A truncated snapshot holds the first members in join order: a newcomer is past its end.
      if (!current.truncated && !members.some((m) => m.client === member.client)) members = [...members, member];
    } else {
      members = members.filter((m) => m.client !== member.client);
    }
    const count = Math.max(0, current.count + (kind === "join" ? 1 : -1));
    const presence = { count, members, truncated: current.truncated && members.length < count };
    this.#presence = presence;
    this.emit("presence", { kind, member, presence });
  }

  /** @internal Protocol 2: the server refused this subscription (or its presence). */
  refused(error: SubscriptionError): void {
    if (error.reason !== "presence_unavailable") this.close();
    this.emit("error", error);
  }

  #confirm(epoch: string, seq: number): void {
    this.#streamEpoch = epoch;
    // Without a position, start at the channel's current one. With one, either the resume succeeded, or
    // a resync_required follows at once.
    if (this.#cursor.position === null) this.#cursor.reset({ epoch, seq });
    if (this.#state === "idle") this.#setState("live");
  }

  /** @internal */
  event(event: Received<E>, epoch: string): void {
    this.#push({ kind: "event", epoch, event });
  }

  /** @internal */
  resyncRequired(frame: ResyncRequired): void {
    this.#streamEpoch = frame.epoch;
    this.#push({ kind: "resync", info: { reason: frame.reason, channel: this.#channel, epoch: frame.epoch, seq: frame.seq } });
  }

  /** @internal */
  close(): void {
    this.#queue = [];
    this.#confirmed = false;
    this.#setState("closed");
  }

  /** @internal The subscription's position, as protocol 2's subscribe frame carries it. */
  subscribeFrame(id: string): string {
    const frame: Record<string, unknown> = { type: "subscribe", id, channel: this.#channel };
    const position = this.#cursor.position;
    if (position !== null) {
      frame["epoch"] = position.epoch;
      frame["last_seq"] = position.seq;
    }
    if (this.#options.presence === true) frame["presence"] = true;
    return JSON.stringify(frame);
  }

  // -- applying, one item at a time ----------------------------------------------------------------

  #push(item: QueueItem<E>): void {
    if (this.#state === "closed") return;
    this.#queue.push(item);
    if (!this.#running) void this.#drain();
  }

  async #drain(): Promise<void> {
    this.#running = true;
    try {
      let item: QueueItem<E> | undefined;
      while ((item = this.#queue.shift()) !== undefined && this.#state !== "closed") {
        if (item.kind === "event") await this.#apply(item.event, item.epoch);
        else await this.#resync(item.info);
      }
    } finally {
      this.#running = false;
    }
  }

  async #apply(event: Received<E>, epoch: string): Promise<void> {
    const position = this.#cursor.position;
    // An event of another stream than the position's: the connection's resume failed and a
    // resync_required is on its way, or the position came from a snapshot of another epoch.
    if (position === null || epoch !== position.epoch) return;
    const verdict = this.#cursor.judge(event.seq);
    if (verdict === "duplicate") {
      this.stats.duplicates += 1;
      return;
    }
    if (verdict === "gap") {
      // A correct server never skips a seq; reconnecting from the last applied event lets it replay
      // what is missing, or say resync_required where it cannot.
      this.stats.gaps += 1;
      this.#queue = [];
      this.#host.reconnect(`gap: expected seq ${position.seq + 1}, received ${event.seq}`);
      return;
    }
    this.#applying = event;
    try {
      await this.#options.onEvent?.(event);
      await Promise.all(this.listeners("event").map((listener) => listener(event)));
    } catch (error) {
      this.#host.report(new ClientError(`applying event seq ${event.seq} failed`, undefined, { cause: error }));
    } finally {
      this.#applying = null;
    }
    if (this.#state === "closed" || this.#cursor.position !== position) return; // replaced meanwhile
    this.#cursor.advance(event.seq);
    this.stats.applied += 1;
    this.emit("position", this.#cursor.position!);
  }

  async #resync(info: ResyncInfo): Promise<void> {
    this.stats.resyncs += 1;
    this.#setState("resyncing");
    this.emit("resync", info);
    let next: Position;
    if (this.#options.resync !== undefined) {
      try {
        next = checkPosition(await this.#options.resync(info));
      } catch (error) {
        // No consistent state to continue from: reconnect from the old position, after a backoff. The
        // server replays from there, or says resync_required again and this runs again.
        this.#host.report(new ClientError(`resync (${info.reason}) failed`, undefined, { cause: error }));
        this.#queue = [];
        if (this.#state !== "closed") this.#setState("live");
        this.#host.reconnect("resync failed");
        return;
      }
    } else if (info.epoch !== null && info.seq !== null) {
      next = { epoch: info.epoch, seq: info.seq };
    } else {
      this.#host.report(new ClientError("resync() needs a resync callback in the subscription options"));
      if (this.#state !== "closed") this.#setState("live");
      return;
    }
    if (this.#state === "closed") return;
    this.#cursor.reset(next);
    this.emit("position", next);
    this.#setState("live");
    const streamEpoch = info.epoch ?? this.#streamEpoch;
    if (streamEpoch !== null && next.epoch !== streamEpoch) {
      // The snapshot belongs to another stream than this connection's (the server restarted between the
      // two): resume from the snapshot on a new connection.
      this.#queue = [];
      this.#host.reconnect("the snapshot's epoch differs from the stream's");
    }
    // Events queued behind this item follow; those the snapshot already contains are dropped as
    // duplicates, and a snapshot older than the server's position shows up as a gap (reconnect, resume).
  }

  #setState(state: SubscriptionState): void {
    if (this.#state === state) return;
    this.#state = state;
    this.emit("state", state);
  }
}

interface Attempt {
  readonly transport: Transport;
  /** Each subscription's position when the attempt started, to tell whether it made progress. */
  readonly from: Map<Subscription<never>, Position | null>;
  opened: boolean;
  welcome: Welcome | WelcomeV2 | null;
  /** The epoch of the events arriving now: the welcome's, then that of each resync_required. */
  epoch: string | null;
  /** Protocol 2: the same per channel (set by `subscribed`, then each `resync_required`). */
  readonly epochs: Map<string, string>;
  /** Protocol 2: subscribe requests sent on this connection and not answered, by request id. */
  readonly requests: Map<string, { readonly kind: "subscribe" | "unsubscribe"; readonly subscription: Subscription<never> }>;
}

const NOT_GIVEN = Symbol("not given");
/** The server closed the connection because it fell behind its outbound queue bound. */
const SLOW_CONSUMER = 4001;

const samePosition = (a: Position, b: Position | null): boolean => b !== null && a.epoch === b.epoch && a.seq === b.seq;

/** Whether every subscription that had a position when the attempt started still has that one. */
const madeNoProgress = (from: ReadonlyMap<Subscription<never>, Position | null>): boolean => {
  let any = false;
  for (const [subscription, position] of from) {
    if (position === null) continue;
    any = true;
    if (!samePosition(position, subscription.position)) return false;
  }
  return any;
};

/**
 * A connection to one rtbroadcast stream that keeps itself up: it reconnects with capped exponential
 * backoff and full jitter, resumes from the last event applied, detects dead connections with a
 * heartbeat, and stops on refusals.
 *
 * ```ts
 * const client = new Client<ChatEvent>({ url: "ws://localhost:8000/realtime?room=lobby" });
 * client.subscribe({ resync: loadSnapshot, onEvent: (event) => render(event) });
 * client.connect();
 * ```
 */
export class Client<E extends EventShape = AnyEvent> extends Emitter<ClientEvents<E>> {
  readonly #options: ClientOptions<E>;
  readonly #protocol: 1 | 2;
  readonly #WebSocket: WebSocketConstructor | undefined;
  readonly #EventSource: EventSourceConstructor | undefined;
  readonly #sseUrl: string | null;
  #state: ClientState = "idle";
  /** Protocol 1: the one subscription. */
  #subscription: Subscription<E> | null = null;
  /** Protocol 2: the subscriptions by channel (the client's and the server's). */
  readonly #subscriptions = new Map<string, Subscription<E>>();
  #nextRequest = 0;
  #attempt: Attempt | null = null;
  #failures = 0;
  #websocketFailures = 0;
  /** Slow-consumer closes in a row that brought no event: the backlog itself overflows the server's queue. */
  #stalledResumes = 0;
  #restartReason: string | null = null;
  #transport: TransportKind;
  #token: string | undefined | typeof NOT_GIVEN;
  readonly #timers: Record<"retry" | "connect" | "stable" | "ping" | "dead", ReturnType<typeof setTimeout> | undefined> = {
    retry: undefined,
    connect: undefined,
    stable: undefined,
    ping: undefined,
    dead: undefined,
  };
  /** Protocol 2: subscribe requests answered `try_again_later`, retried after a backoff. */
  readonly #retrySubscribe = new Map<Subscription<E>, { failures: number; timer: ReturnType<typeof setTimeout> | undefined }>();
  #removePageListeners: (() => void) | null = null;
  /** Counters of the connection state machine. */
  readonly stats: ClientStats = { attempts: 0, welcomes: 0, resumed: 0, heartbeatTimeouts: 0 };

  constructor(options: ClientOptions<E>) {
    super();
    this.#options = options;
    const url = new URL(options.url); // throws TypeError on a malformed address
    if (url.protocol !== "ws:" && url.protocol !== "wss:") {
      throw new TypeError(`url must be a ws:// or wss:// address, not ${url.protocol}`);
    }
    if (options.protocol !== undefined && options.protocol !== 1 && options.protocol !== 2) {
      throw new TypeError(`protocol must be 1 or 2, not ${String(options.protocol)}`);
    }
    this.#protocol = options.protocol ?? 1;
    const g = globalThis as { WebSocket?: WebSocketConstructor; EventSource?: EventSourceConstructor };
    this.#WebSocket = options.WebSocket ?? g.WebSocket;
    this.#EventSource = options.EventSource ?? g.EventSource;
    this.#sseUrl = options.sseUrl === undefined ? sseUrlFor(options.url) : options.sseUrl;
    const sseAvailable = this.#sseUrl !== null && this.#EventSource !== undefined;
    if (this.#WebSocket === undefined && !sseAvailable) {
      throw new TypeError(
        "no WebSocket here: pass the WebSocket option (Node 20: run with --experimental-websocket, or pass the 'ws' package's WebSocket)",
      );
    }
    this.#transport = this.#WebSocket !== undefined ? "websocket" : "sse";
    this.#token = options.token ?? NOT_GIVEN;
  }

  get state(): ClientState {
    return this.#state;
  }

  /** The wire protocol this client speaks. */
  get protocol(): 1 | 2 {
    return this.#protocol;
  }

  /** The transport the next (or current) attempt uses. */
  get transport(): TransportKind {
    return this.#transport;
  }

  /** The subscription this client carries (protocol 1), if any. */
  get subscription(): Subscription<E> | null {
    return this.#subscription;
  }

  /** Protocol 2: the subscriptions by channel, the server's included (protocol 1: the one, once its channel is known). */
  get subscriptions(): ReadonlyMap<string, Subscription<E>> {
    if (this.#protocol === 2) return new Map(this.#subscriptions);
    const channel = this.#subscription?.channel ?? null;
    return channel === null ? new Map() : new Map([[channel, this.#subscription!]]);
  }

  /**
   * Subscribe to a channel's stream.
   *
   * Protocol 1 carries one channel per connection: the URL names it, and a client has one subscription;
   * call before `connect()`. Protocol 2: give the `channel`; call any time, each channel once (a new
   * subscription after `unsubscribe()` is fine).
   *
   * @throws ClientError when the client is closed, or (protocol 1) already has its subscription, or
   *   (protocol 2) already subscribes to the channel.
   * @throws TypeError (protocol 2) without a channel.
   */
  subscribe<T extends E = E>(options: SubscriptionOptions<T> = {}): Subscription<T> {
    if (this.#state === "closed") throw new ClientError("the client is closed");
    if (this.#protocol === 1) {
      if (this.#subscription !== null) {
        throw new ClientError("protocol 1 carries one channel per connection: this client already has its subscription");
      }
      const subscription = new Subscription<T>(this.#host(), options);
      this.#subscription = subscription as unknown as Subscription<E>;
      return subscription;
    }
    const channel = options.channel;
    if (typeof channel !== "string" || channel === "") throw new TypeError("protocol 2: subscribe({channel}) needs the channel's name");
    if (this.#subscriptions.has(channel)) throw new ClientError(`this client already subscribes to '${channel}'`);
    const subscription = new Subscription<T>(this.#host(), options);
    this.#subscriptions.set(channel, subscription as unknown as Subscription<E>);
    if (this.#state !== "idle") void this.#activate(subscription as unknown as Subscription<E>);
    return subscription;
  }

  /** Start connecting (and keep reconnecting until `close()` or a refusal). Protocol 1: subscribes if nobody did. */
  connect(): void {
    if (this.#state !== "idle") return;
    if (this.#protocol === 1 && this.#subscription === null) this.subscribe();
    this.#watchPage();
    void this.#open();
  }

  /** Stop for good: close the connection, cancel retries. */
  close(): void {
    if (this.#state === "closed") return;
    this.#stop();
    this.#subscription?.close();
    for (const subscription of this.#subscriptions.values()) subscription.close();
    for (const retry of this.#retrySubscribe.values()) clearTimeout(retry.timer);
    this.#retrySubscribe.clear();
  }

  /** Resolve once the client reaches `state` (for example `connected`); reject if it closes first. */
  when(state: ClientState, options: { timeout?: number } = {}): Promise<void> {
    if (this.#state === state) return Promise.resolve();
    if (this.#state === "closed") return Promise.reject(new ClientError(`the client is closed: it cannot reach '${state}'`));
    return new Promise((resolve, reject) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const off: Unsubscribe = this.on("state", (now) => {
        if (now === state) {
          done();
          resolve();
        } else if (now === "closed") {
          done();
          reject(new ClientError(`the client closed before reaching '${state}'`));
        }
      });
      const done = (): void => {
        off();
        if (timer !== undefined) clearTimeout(timer);
      };
      if (options.timeout !== undefined) {
        timer = setTimeout(() => {
          done();
          reject(new ClientError(`the client did not reach '${state}' within ${options.timeout} ms`));
        }, options.timeout);
      }
    });
  }

  #host(): SubscriptionHost {
    return {
      reconnect: (reason) => this.#reconnect(reason),
      report: (error) => this.emit("error", error),
      unsubscribe: (subscription) => this.#unsubscribe(subscription as unknown as Subscription<E>),
    };
  }

  /** Every subscription the connection carries. */
  #all(): Subscription<E>[] {
    if (this.#protocol === 1) return this.#subscription === null ? [] : [this.#subscription];
    return [...this.#subscriptions.values()];
  }

  // -- connecting ------------------------------------------------------------------------------------

  async #open(): Promise<void> {
    this.#setState("connecting");
    const subscriptions = this.#all();
    try {
      await Promise.all(subscriptions.map((s) => (s.needsInitialSnapshot ? s.loadInitialSnapshot() : undefined)));
      if (this.#restartReason !== null) {
        const reason = this.#restartReason;
        await Promise.all(subscriptions.map((s) => s.restart(reason)));
        this.#restartReason = null;
      }
      if (this.#token === NOT_GIVEN && this.#options.getToken !== undefined) {
        this.#token = (await this.#options.getToken({ reason: "connect" })) ?? NOT_GIVEN;
      }
    } catch (error) {
      if (this.#state !== "connecting") return;
      this.emit("error", new ClientError("preparing the connection failed", undefined, { cause: error }));
      this.#retry(ABNORMAL_CLOSURE, "preparing the connection failed");
      return;
    }
    if (this.#state !== "connecting") return; // closed meanwhile
    const kind = this.#transport;
    const base = kind === "websocket" ? this.#options.url : this.#sseUrl!;
    const url = new URL(base);
    url.searchParams.delete("epoch");
    url.searchParams.delete("last_seq");
    if (this.#protocol === 1) {
      for (const [name, value] of Object.entries(this.#subscription!.resumeParams())) url.searchParams.set(name, value);
    } else {
      this.#protocol2Query(url, kind);
    }
    if (this.#token !== NOT_GIVEN && this.#token !== undefined) {
      url.searchParams.set(this.#options.tokenParam ?? "token", this.#token);
    }
    this.stats.attempts += 1;
    let attempt: Attempt | null = null;
    const handlers = {
      open: () => {
        if (attempt !== null) attempt.opened = true;
      },
      message: (text: string) => {
        if (attempt !== null && this.#attempt === attempt) this.#onMessage(attempt, text);
      },
      close: (code: number, reason: string) => {
        if (attempt !== null && this.#attempt === attempt) this.#onClose(attempt, code, reason);
      },
    };
    try {
      const transport =
        kind === "websocket"
          ? openWebSocket(this.#WebSocket!, url.toString(), handlers)
          : openEventSource(this.#EventSource!, url.toString(), handlers);
      const from = new Map<Subscription<never>, Position | null>();
      for (const s of subscriptions) from.set(s as unknown as Subscription<never>, s.position);
      attempt = { transport, from, opened: false, welcome: null, epoch: null, epochs: new Map(), requests: new Map() };
    } catch (error) {
      this.emit("error", new ClientError(`cannot open ${url.toString()}`, undefined, { cause: error }));
      this.#retry(ABNORMAL_CLOSURE, "cannot open the connection");
      return;
    }
    this.#attempt = attempt;
    const connectTimeout = this.#options.connectTimeout ?? 10000;
    this.#timers.connect = setTimeout(() => {
      if (this.#attempt === attempt) this.#drop(attempt, ABNORMAL_CLOSURE, `no welcome within ${connectTimeout} ms`);
    }, connectTimeout);
  }

  /**
   * Protocol 2's query: `protocol=2`, and `resume` with the positions the server resumes itself: on a
   * WebSocket those of its own (server-side) subscriptions, the client's resume in their subscribe
   * frames; over SSE, which has no client frames, every channel (the client's as `channel=` parameters).
   */
  #protocol2Query(url: URL, kind: TransportKind): void {
    url.searchParams.set("protocol", "2");
    url.searchParams.delete("resume");
    url.searchParams.delete("channel");
    const positions = new Map<string, Position>();
    for (const [channel, subscription] of this.#subscriptions) {
      if (subscription.state === "closed") continue;
      if (kind === "sse" && !subscription.serverSide) url.searchParams.append("channel", channel);
      const position = subscription.position;
      if (position !== null && (kind === "sse" || subscription.serverSide || subscription.resumeInUrl)) {
        positions.set(channel, position);
      }
    }
    if (positions.size > 0) url.searchParams.set("resume", encodePositions(positions));
  }

  #onMessage(attempt: Attempt, text: string): void {
    this.#armDeadline();
    if (this.#protocol === 2) {
      this.#onMessageV2(attempt, text);
      return;
    }
    let decoded;
    try {
      decoded = decodeFrame(text);
    } catch (error) {
      this.emit("error", error instanceof FrameError ? error : new ClientError("bad frame", undefined, { cause: error }));
      return;
    }
    const subscription = this.#subscription!;
    if ("event" in decoded) {
      if (attempt.epoch === null) {
        this.emit("error", new ClientError(`event seq ${decoded.event.seq} before the welcome: ignored`));
        return;
      }
      subscription.event(decoded.event as unknown as Received<E>, attempt.epoch);
      return;
    }
    const frame = decoded.frame;
    switch (frame.type) {
      case "welcome":
        this.#onWelcome(attempt, frame);
        return;
      case "resync_required":
        attempt.epoch = frame.epoch;
        subscription.resyncRequired(frame);
        return;
      case "error":
        this.emit("error", new ClientError(`the server rejected a frame: ${frame.code}: ${frame.message}`));
        return;
      case "pong":
        return;
    }
  }

  #onMessageV2(attempt: Attempt, text: string): void {
    let decoded;
    try {
      decoded = decodeFrameV2(text);
    } catch (error) {
      this.emit("error", error instanceof FrameError ? error : new ClientError("bad frame", undefined, { cause: error }));
      return;
    }
    if (decoded === null) return; // a frame type of a later server
    if ("event" in decoded) {
      const epoch = attempt.epochs.get(decoded.channel);
      const subscription = this.#subscriptions.get(decoded.channel);
      // Not (or no longer) subscribed here: an event queued before an unsubscribe was confirmed.
      if (epoch === undefined || subscription === undefined || subscription.state === "closed") return;
      subscription.event(decoded.event as unknown as Received<E>, epoch);
      return;
    }
    const frame = decoded.frame;
    switch (frame.type) {
      case "welcome":
        if (frame.protocol !== 2) {
          this.#drop(attempt, ABNORMAL_CLOSURE, `the server answered with protocol ${String(frame.protocol)}, not 2`);
          return;
        }
        this.#onWelcome(attempt, frame);
        return;
      case "subscribed":
        this.#onSubscribed(attempt, frame);
        return;
      case "unsubscribed": {
        const request = frame.id === null ? undefined : attempt.requests.get(frame.id);
        if (request !== undefined) attempt.requests.delete(frame.id!);
        attempt.epochs.delete(frame.channel);
        const subscription = request?.subscription ?? this.#subscriptions.get(frame.channel);
        if (subscription === undefined) return;
        const current = this.#subscriptions.get(frame.channel);
        if (current === (subscription as unknown)) this.#subscriptions.delete(frame.channel);
        subscription.close();
        this.emit("unsubscribed", subscription as unknown as Subscription<E>, frame.reason);
        if (current !== undefined && current !== (subscription as unknown) && current.state !== "closed") {
          this.#sendSubscribe(attempt, current); // subscribed again while the unsubscribe was on its way
        }
        return;
      }
      case "resync_required": {
        const subscription = this.#subscriptions.get(frame.channel!);
        if (subscription === undefined || subscription.state === "closed") return;
        attempt.epochs.set(frame.channel!, frame.epoch);
        subscription.resyncRequired(frame);
        return;
      }
      case "presence_join":
      case "presence_leave":
        this.#subscriptions.get(frame.channel)?.presenceChanged(frame.type === "presence_join" ? "join" : "leave", frame.member);
        return;
      case "error":
        this.#onErrorV2(attempt, frame);
        return;
      case "pong":
        return;
    }
  }

  #onSubscribed(attempt: Attempt, frame: Subscribed): void {
    const request = frame.id === null ? undefined : attempt.requests.get(frame.id);
    if (request !== undefined) attempt.requests.delete(frame.id!);
    let subscription = this.#subscriptions.get(frame.channel);
    if (request !== undefined && (request.subscription as unknown) !== subscription) return; // unsubscribed meanwhile
    let created = false;
    if (subscription === undefined || subscription.state === "closed") {
      if (frame.id !== null) return; // an answer to a request of a subscription that is gone
      const options = this.#options.serverSubscription?.(frame.channel) ?? {};
      subscription = new Subscription<E>(this.#host(), { ...options, channel: frame.channel }, true);
      this.#subscriptions.set(frame.channel, subscription);
      created = true;
    }
    attempt.epochs.set(frame.channel, frame.epoch);
    if (frame.id === null) subscription.resumeInUrl = true;
    if (frame.resumed) this.stats.resumed += 1;
    if (created) this.emit("subscription", subscription);
    subscription.subscribed(frame);
  }

  #onErrorV2(attempt: Attempt, frame: ErrorFrame): void {
    const request = frame.id === null || frame.id === undefined ? undefined : attempt.requests.get(frame.id);
    const channel = frame.channel ?? null;
    const error = new SubscriptionError(
      `the server refused ${request?.kind ?? "a frame"}${channel !== null ? ` of '${channel}'` : ""}: ${frame.code}: ${frame.message}`,
      frame.code,
      channel,
    );
    if (frame.code === "presence_unavailable") {
      // Follows the subscription's confirmation: it stands, without presence.
      const subscription = channel === null ? undefined : this.#subscriptions.get(channel);
      subscription?.refused(error);
      this.emit("error", error);
      return;
    }
    if (request === undefined) {
      this.emit("error", error); // a server-side channel refused at connect, or a frame the server could not read
      return;
    }
    attempt.requests.delete(frame.id!);
    const subscription = request.subscription as unknown as Subscription<E>;
    if (request.kind === "unsubscribe") {
      if (frame.code !== "not_subscribed") this.emit("error", error);
      return; // not subscribed (any more): nothing to end
    }
    if (this.#subscriptions.get(subscription.channel!) !== subscription || subscription.state === "closed") return;
    if (frame.code === "already_subscribed" && subscription.confirmed) {
      // The server subscribed this connection to the channel itself (its `subscribed` with id null came
      // after this client's request was sent): the subscription stands.
      return;
    }
    if (frame.code === "try_again_later") {
      // A channel's connection limit, or the server's backend is down: ask again after a backoff.
      const retry = this.#retrySubscribe.get(subscription) ?? { failures: 0, timer: undefined };
      const delay = backoffDelay(retry.failures, this.#options.backoff);
      retry.failures += 1;
      clearTimeout(retry.timer);
      retry.timer = setTimeout(() => {
        const now = this.#attempt;
        if (now !== null && now.welcome !== null && subscription.state !== "closed") this.#sendSubscribe(now, subscription);
      }, delay);
      this.#retrySubscribe.set(subscription, retry);
      this.emit("error", error);
      return;
    }
    this.#subscriptions.delete(subscription.channel!);
    subscription.refused(error);
    this.emit("error", error);
  }

  /** Protocol 2: send `subscription`'s subscribe frame on `attempt` (WebSocket), or reconnect (SSE). */
  #sendSubscribe(attempt: Attempt, subscription: Subscription<E>): void {
    if (subscription.state === "closed" || subscription.confirmed) return;
    for (const pending of attempt.requests.values()) {
      if (pending.subscription === (subscription as unknown)) return; // asked already
      // Still unsubscribing an earlier subscription of this channel: ask once that is confirmed.
      if (pending.kind === "unsubscribe" && pending.subscription.channel === subscription.channel) return;
    }
    if (attempt.transport.kind === "sse") {
      // No client frames over SSE: a new connection names every channel in its URL.
      this.#reconnect("subscribing over SSE");
      return;
    }
    const id = `s${++this.#nextRequest}`;
    if (attempt.transport.send(subscription.subscribeFrame(id))) {
      attempt.requests.set(id, { kind: "subscribe", subscription: subscription as unknown as Subscription<never> });
    }
  }

  /** Protocol 2: a subscription made while the client runs: its first snapshot, then its subscribe frame. */
  async #activate(subscription: Subscription<E>): Promise<void> {
    if (subscription.needsInitialSnapshot) {
      try {
        await subscription.loadInitialSnapshot();
      } catch (error) {
        this.emit("error", new ClientError(`the first snapshot of '${subscription.channel}' failed`, undefined, { cause: error }));
        // The next connection tries again (#open loads what is missing).
        return;
      }
    }
    const attempt = this.#attempt;
    if (attempt !== null && attempt.welcome !== null && this.#state === "connected") this.#sendSubscribe(attempt, subscription);
  }

  #unsubscribe(subscription: Subscription<E>): void {
    if (this.#protocol === 1) {
      this.close(); // protocol 1: the connection is the subscription
      return;
    }
    const channel = subscription.channel!;
    const retry = this.#retrySubscribe.get(subscription);
    if (retry !== undefined) clearTimeout(retry.timer);
    this.#retrySubscribe.delete(subscription);
    const attempt = this.#attempt;
    const live = attempt !== null && attempt.welcome !== null;
    if (!live || attempt.transport.kind === "sse") {
      if (this.#subscriptions.get(channel) === subscription) this.#subscriptions.delete(channel);
      this.emit("unsubscribed", subscription, "client");
      if (live) this.#reconnect("unsubscribing over SSE");
      return;
    }
    // Keep the entry until the server confirms, so that events in flight find a closed subscription.
    const id = `u${++this.#nextRequest}`;
    if (attempt.transport.send(JSON.stringify({ type: "unsubscribe", id, channel }))) {
      attempt.requests.set(id, { kind: "unsubscribe", subscription: subscription as unknown as Subscription<never> });
    } else if (this.#subscriptions.get(channel) === subscription) {
      this.#subscriptions.delete(channel);
      this.emit("unsubscribed", subscription, "client");
    }
  }

  #onWelcome(attempt: Attempt, welcome: Welcome | WelcomeV2): void {
    clearTimeout(this.#timers.connect);
    attempt.opened = true;
    attempt.welcome = welcome;
    this.#websocketFailures = 0;
    this.stats.welcomes += 1;
    if ("channel" in welcome) {
      attempt.epoch = welcome.epoch;
      if (welcome.resumed) this.stats.resumed += 1;
      this.#subscription!.welcome(welcome);
    }
    this.#timers.stable = setTimeout(() => {
      if (this.#attempt === attempt) this.#failures = 0;
    }, this.#options.stableAfter ?? 5000);
    if (attempt.transport.kind === "websocket") this.#startHeartbeat(attempt, welcome);
    this.#setState("connected");
    this.emit("connected", welcome);
    if (this.#protocol === 2) {
      for (const subscription of this.#subscriptions.values()) {
        // Server-side subscriptions come back by themselves (their positions are in the URL); over SSE
        // every channel is in the URL.
        if (!subscription.serverSide && attempt.transport.kind === "websocket" && !subscription.needsInitialSnapshot) {
          this.#sendSubscribe(attempt, subscription);
        } else if (subscription.needsInitialSnapshot && !subscription.serverSide) {
          void this.#activate(subscription);
        }
      }
    }
  }

  // -- heartbeat -------------------------------------------------------------------------------------

  #pingPeriod(welcome: { readonly heartbeat_interval: number }): number {
    return Math.max(100, this.#options.heartbeatInterval ?? welcome.heartbeat_interval * 1000);
  }

  #startHeartbeat(attempt: Attempt, welcome: Welcome | WelcomeV2): void {
    const period = this.#pingPeriod(welcome);
    this.#timers.ping = setInterval(() => {
      if (this.#attempt === attempt) attempt.transport.send('{"type":"ping"}');
    }, period);
    this.#armDeadline();
  }

  /** Any frame proves the connection alive: push the deadline back. */
  #armDeadline(): void {
    const attempt = this.#attempt;
    if (attempt === null || attempt.welcome === null || attempt.transport.kind !== "websocket") return;
    clearTimeout(this.#timers.dead);
    const bound = this.#pingPeriod(attempt.welcome) + (this.#options.heartbeatTimeout ?? 10000);
    this.#timers.dead = setTimeout(() => {
      if (this.#attempt !== attempt) return;
      this.stats.heartbeatTimeouts += 1;
      this.#drop(attempt, ABNORMAL_CLOSURE, `no frame within ${bound} ms`);
    }, bound);
  }

  // -- disconnecting ---------------------------------------------------------------------------------

  /** Give up on `attempt` without waiting for a closing handshake, then handle it as closed with `code`. */
  #drop(attempt: Attempt, code: number, reason: string): void {
    attempt.transport.abandon();
    this.#onClose(attempt, code, reason);
  }

  #reconnect(reason: string): void {
    const attempt = this.#attempt;
    if (this.#state === "closed") return;
    // Without a connection the client is already on its way to the next attempt, which resumes from the
    // subscription's current position.
    if (attempt !== null) this.#drop(attempt, ABNORMAL_CLOSURE, reason);
  }

  #onClose(attempt: Attempt, code: number, reason: string): void {
    this.#clearConnectionTimers();
    this.#attempt = null;
    for (const [channel, subscription] of this.#subscriptions) {
      subscription.disconnected();
      if (subscription.state === "closed") {
        // Its unsubscribe was not confirmed before the drop: the next connection does not carry it.
        this.#subscriptions.delete(channel);
        this.emit("unsubscribed", subscription, "client");
      }
    }
    if (attempt.transport.kind === "websocket" && !attempt.opened) {
      this.#websocketFailures += 1;
      const threshold = this.#options.sseFallbackAfter ?? 2;
      if (this.#websocketFailures >= threshold && this.#sseUrl !== null && this.#EventSource !== undefined) {
        this.#transport = "sse";
      }
    }
    if (code === SLOW_CONSUMER && madeNoProgress(attempt.from)) {
      // Closed for falling behind before a single event was applied: the replay of what was missed is
      // larger than the server's queue bound, so resuming again would fail again. Reload instead.
      this.#stalledResumes += 1;
      if (this.#stalledResumes >= 2) {
        this.#stalledResumes = 0;
        this.#restartReason = "resume_overflow";
      }
    } else if (code === SLOW_CONSUMER) {
      this.#stalledResumes = 0;
    }
    const action = closeAction(code);
    if (action === "reconnect") {
      this.#retry(code, reason);
    } else if (action === "refresh-token" && this.#options.getToken !== undefined) {
      void this.#refreshToken(code, reason);
    } else {
      this.#refuse(code, reason);
    }
  }

  async #refreshToken(code: number, reason: string): Promise<void> {
    this.#setState("connecting");
    const previous = this.#token;
    let fresh: string | null | undefined;
    try {
      fresh = await this.#options.getToken!({ reason: "refused", code, message: reason });
    } catch (error) {
      if (this.#state === "closed") return;
      this.emit("error", new ClientError("getToken failed", code, { cause: error }));
      this.#retry(code, reason); // ask again at the next attempt
      return;
    }
    if (this.#state === "closed") return;
    if (typeof fresh !== "string" || fresh === previous) {
      this.#refuse(code, reason);
      return;
    }
    this.#token = fresh;
    this.#retry(code, reason);
  }

  #refuse(code: number, reason: string): void {
    this.emit("error", new ClientError(`the server ${code === 1000 ? "ended the stream" : "refused the connection"}: ${code} ${reason}`, code));
    this.emit("disconnect", { code, reason, retryIn: null, retry: 0 });
    this.#stop();
  }

  #retry(code: number, reason: string): void {
    const delay = backoffDelay(this.#failures, this.#options.backoff);
    this.#failures += 1;
    this.#setState("waiting");
    this.emit("disconnect", { code, reason, retryIn: delay, retry: this.#failures });
    clearTimeout(this.#timers.retry);
    this.#timers.retry = setTimeout(() => {
      if (this.#state === "waiting") void this.#open();
    }, delay);
  }

  /** Skip the rest of the backoff delay (the page came back online or into view). */
  #retryNow(): void {
    if (this.#state !== "waiting") return;
    clearTimeout(this.#timers.retry);
    void this.#open();
  }

  #stop(): void {
    const attempt = this.#attempt;
    this.#attempt = null;
    this.#clearConnectionTimers();
    clearTimeout(this.#timers.retry);
    attempt?.transport.abandon();
    this.#removePageListeners?.();
    this.#removePageListeners = null;
    this.#setState("closed");
  }

  #clearConnectionTimers(): void {
    clearTimeout(this.#timers.connect);
    clearTimeout(this.#timers.stable);
    clearTimeout(this.#timers.dead);
    clearInterval(this.#timers.ping);
  }

  #setState(state: ClientState): void {
    if (this.#state === state) return;
    this.#state = state;
    this.emit("state", state);
  }

  /** In a browser: retry at once when the network or the page comes back, instead of at the end of the backoff. */
  #watchPage(): void {
    if (this.#options.retryOnResume === false) return;
    const g = globalThis as {
      window?: { addEventListener?: (type: string, fn: () => void) => void; removeEventListener?: (type: string, fn: () => void) => void };
      document?: {
        visibilityState?: string;
        addEventListener?: (type: string, fn: () => void) => void;
        removeEventListener?: (type: string, fn: () => void) => void;
      };
    };
    const win = g.window;
    const doc = g.document;
    if (typeof win?.addEventListener !== "function") return;
    const online = (): void => this.#retryNow();
    const visible = (): void => {
      if (doc?.visibilityState === "visible") this.#retryNow();
    };
    win.addEventListener("online", online);
    doc?.addEventListener?.("visibilitychange", visible);
    this.#removePageListeners = () => {
      win.removeEventListener?.("online", online);
      doc?.removeEventListener?.("visibilitychange", visible);
    };
  }
}
