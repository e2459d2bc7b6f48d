// The client state machine: one Client owns one connection at a time (WebSocket, or SSE as a fallback)
// and the subscriptions it carries. Protocol 1 carries one channel per connection, named by the URL, so
// a Client has at most one Subscription; protocol 2 will let it carry several, with the same API.
import { Cursor, backoffDelay, checkPosition, closeAction } from "./cursor.js";
import { Emitter } from "./emitter.js";
import { FrameError, decodeFrame } from "./frames.js";
import { ABNORMAL_CLOSURE, openEventSource, openWebSocket, sseUrlFor, } from "./transport.js";
/** An error the client reports; `code` is the close code when the server refused or ended the stream. */
export class ClientError extends Error {
    name = "ClientError";
    code;
    constructor(message, code, options) {
        super(message, options);
        this.code = code;
    }
}
/** One channel's stream as the application sees it: events in order, each once, and resyncs. */
export class Subscription extends Emitter {
    #channel;
    #state = "idle";
    #cursor;
    #options;
    #host;
    #queue = [];
    #running = false;
    /** The event `onEvent` is applying now. */
    #applying = null;
    /** The epoch of the events the connection delivers now (its welcome's, then each resync_required's). */
    #streamEpoch = null;
    /** Counters: events applied, duplicates dropped, gaps seen, resyncs run. */
    stats = { applied: 0, duplicates: 0, gaps: 0, resyncs: 0 };
    /** Use `Client.subscribe`. */
    constructor(host, options) {
        super();
        this.#host = host;
        this.#options = options;
        this.#channel = options.channel ?? null;
        this.#cursor = new Cursor(options.position ?? null);
    }
    /** The channel; known from the options or from the server's welcome. */
    get channel() {
        return this.#channel;
    }
    get state() {
        return this.#state;
    }
    /** The last event applied (or the snapshot's position); `null` before the first welcome. */
    get position() {
        return this.#cursor.position;
    }
    /**
     * The events received and not applied yet, in arrival order (the one `onEvent` is applying now
     * first): a backlog to show or to wait for. A copy.
     */
    get pending() {
        const queued = this.#queue.flatMap((item) => (item.kind === "event" ? [item.event] : []));
        return this.#applying === null ? queued : [this.#applying, ...queued];
    }
    /** Reload the snapshot through the `resync` callback now (for example after applying an event failed). */
    resync() {
        this.#push({ kind: "resync", info: { reason: "requested", channel: this.#channel, epoch: null, seq: null } });
    }
    // -- used by Client ------------------------------------------------------------------------------
    /** @internal */
    get needsInitialSnapshot() {
        return this.#cursor.position === null && this.#options.resync !== undefined;
    }
    /** @internal Load the first snapshot (before the first connection). */
    async loadInitialSnapshot() {
        const info = { reason: "initial", channel: this.#channel, epoch: null, seq: null };
        this.stats.resyncs += 1;
        this.emit("resync", info);
        this.#cursor.reset(checkPosition(await this.#options.resync(info)));
    }
    /**
     * @internal Give up resuming: load a snapshot (or, without a resync callback, start at the server's
     * current position) before the next connection.
     */
    async restart(reason) {
        this.#queue = [];
        const info = { reason, channel: this.#channel, epoch: null, seq: null };
        this.stats.resyncs += 1;
        this.emit("resync", info);
        if (this.#options.resync === undefined) {
            this.#cursor.position = null;
            return;
        }
        this.#cursor.reset(checkPosition(await this.#options.resync(info)));
        this.emit("position", this.#cursor.position);
    }
    /** @internal */
    resumeParams() {
        return this.#cursor.resumeParams();
    }
    /** @internal */
    welcome(welcome) {
        if (this.#options.channel !== undefined && welcome.channel !== this.#options.channel) {
            this.#host.report(new ClientError(`the server sent channel '${welcome.channel}', the subscription asked for '${this.#options.channel}'`));
        }
        this.#channel = welcome.channel;
        this.#streamEpoch = welcome.epoch;
        // Without a position, start at the channel's current one. With one, either the resume succeeded, or
        // a resync_required follows at once.
        if (this.#cursor.position === null)
            this.#cursor.reset({ epoch: welcome.epoch, seq: welcome.seq });
        if (this.#state === "idle")
            this.#setState("live");
    }
    /** @internal */
    event(event, epoch) {
        this.#push({ kind: "event", epoch, event });
    }
    /** @internal */
    resyncRequired(frame) {
        this.#streamEpoch = frame.epoch;
        this.#push({ kind: "resync", info: { reason: frame.reason, channel: this.#channel, epoch: frame.epoch, seq: frame.seq } });
    }
    /** @internal */
    close() {
        this.#queue = [];
        this.#setState("closed");
    }
    // -- applying, one item at a time ----------------------------------------------------------------
    #push(item) {
        if (this.#state === "closed")
            return;
        this.#queue.push(item);
        if (!this.#running)
            void this.#drain();
    }
    async #drain() {
        this.#running = true;
        try {
            let item;
            while ((item = this.#queue.shift()) !== undefined && this.#state !== "closed") {
                if (item.kind === "event")
                    await this.#apply(item.event, item.epoch);
                else
                    await this.#resync(item.info);
            }
        }
        finally {
            this.#running = false;
        }
    }
    async #apply(event, epoch) {
        const position = this.#cursor.position;
        // An event of another stream than the position's: the connection's resume failed and a
        // resync_required is on its way, or the position came from a snapshot of another epoch.
        if (position === null || epoch !== position.epoch)
            return;
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
        }
        catch (error) {
            this.#host.report(new ClientError(`applying event seq ${event.seq} failed`, undefined, { cause: error }));
        }
        finally {
            this.#applying = null;
        }
        if (this.#state === "closed" || this.#cursor.position !== position)
            return; // replaced meanwhile
        this.#cursor.advance(event.seq);
        this.stats.applied += 1;
        this.emit("position", this.#cursor.position);
    }
    async #resync(info) {
        this.stats.resyncs += 1;
        this.#setState("resyncing");
        this.emit("resync", info);
        let next;
        if (this.#options.resync !== undefined) {
            try {
                next = checkPosition(await this.#options.resync(info));
            }
            catch (error) {
                // No consistent state to continue from: reconnect from the old position, after a backoff. The
                // server replays from there, or says resync_required again and this runs again.
                this.#host.report(new ClientError(`resync (${info.reason}) failed`, undefined, { cause: error }));
                this.#queue = [];
                if (this.#state !== "closed")
                    this.#setState("live");
                this.#host.reconnect("resync failed");
                return;
            }
        }
        else if (info.epoch !== null && info.seq !== null) {
            next = { epoch: info.epoch, seq: info.seq };
        }
        else {
            this.#host.report(new ClientError("resync() needs a resync callback in the subscription options"));
            if (this.#state !== "closed")
                this.#setState("live");
            return;
        }
        if (this.#state === "closed")
            return;
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
    #setState(state) {
        if (this.#state === state)
            return;
        this.#state = state;
        this.emit("state", state);
    }
}
const NOT_GIVEN = Symbol("not given");
/** The server closed the connection because it fell behind its outbound queue bound. */
const SLOW_CONSUMER = 4001;
const samePosition = (a, b) => b !== null && a.epoch === b.epoch && a.seq === b.seq;
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
export class Client extends Emitter {
    #options;
    #WebSocket;
    #EventSource;
    #sseUrl;
    #state = "idle";
    #subscription = null;
    #attempt = null;
    #failures = 0;
    #websocketFailures = 0;
    /** Slow-consumer closes in a row that brought no event: the backlog itself overflows the server's queue. */
    #stalledResumes = 0;
    #restartReason = null;
    #transport;
    #token;
    #timers = {
        retry: undefined,
        connect: undefined,
        stable: undefined,
        ping: undefined,
        dead: undefined,
    };
    #removePageListeners = null;
    /** Counters of the connection state machine. */
    stats = { attempts: 0, welcomes: 0, resumed: 0, heartbeatTimeouts: 0 };
    constructor(options) {
        super();
        this.#options = options;
        const url = new URL(options.url); // throws TypeError on a malformed address
        if (url.protocol !== "ws:" && url.protocol !== "wss:") {
            throw new TypeError(`url must be a ws:// or wss:// address, not ${url.protocol}`);
        }
        const g = globalThis;
        this.#WebSocket = options.WebSocket ?? g.WebSocket;
        this.#EventSource = options.EventSource ?? g.EventSource;
        this.#sseUrl = options.sseUrl === undefined ? sseUrlFor(options.url) : options.sseUrl;
        const sseAvailable = this.#sseUrl !== null && this.#EventSource !== undefined;
        if (this.#WebSocket === undefined && !sseAvailable) {
            throw new TypeError("no WebSocket here: pass the WebSocket option (Node 20: run with --experimental-websocket, or pass the 'ws' package's WebSocket)");
        }
        this.#transport = this.#WebSocket !== undefined ? "websocket" : "sse";
        this.#token = options.token ?? NOT_GIVEN;
    }
    get state() {
        return this.#state;
    }
    /** The transport the next (or current) attempt uses. */
    get transport() {
        return this.#transport;
    }
    /** The subscription this client carries, if any. */
    get subscription() {
        return this.#subscription;
    }
    /**
     * Subscribe to the stream. Protocol 1 carries one channel per connection: the URL names it, and a
     * client has one subscription. Call before `connect()`.
     */
    subscribe(options = {}) {
        if (this.#subscription !== null) {
            throw new ClientError("protocol 1 carries one channel per connection: this client already has its subscription");
        }
        if (this.#state === "closed")
            throw new ClientError("the client is closed");
        const subscription = new Subscription({ reconnect: (reason) => this.#reconnect(reason), report: (error) => this.emit("error", error) }, options);
        this.#subscription = subscription;
        return subscription;
    }
    /** Start connecting (and keep reconnecting until `close()` or a refusal). Subscribes if nobody did. */
    connect() {
        if (this.#state !== "idle")
            return;
        if (this.#subscription === null)
            this.subscribe();
        this.#watchPage();
        void this.#open();
    }
    /** Stop for good: close the connection, cancel retries. */
    close() {
        if (this.#state === "closed")
            return;
        this.#stop();
        this.#subscription?.close();
    }
    /** Resolve once the client reaches `state` (for example `connected`); reject if it closes first. */
    when(state, options = {}) {
        if (this.#state === state)
            return Promise.resolve();
        if (this.#state === "closed")
            return Promise.reject(new ClientError(`the client is closed: it cannot reach '${state}'`));
        return new Promise((resolve, reject) => {
            let timer;
            const off = this.on("state", (now) => {
                if (now === state) {
                    done();
                    resolve();
                }
                else if (now === "closed") {
                    done();
                    reject(new ClientError(`the client closed before reaching '${state}'`));
                }
            });
            const done = () => {
                off();
                if (timer !== undefined)
                    clearTimeout(timer);
            };
            if (options.timeout !== undefined) {
                timer = setTimeout(() => {
                    done();
                    reject(new ClientError(`the client did not reach '${state}' within ${options.timeout} ms`));
                }, options.timeout);
            }
        });
    }
    // -- connecting ------------------------------------------------------------------------------------
    async #open() {
        this.#setState("connecting");
        const subscription = this.#subscription;
        try {
            if (subscription.needsInitialSnapshot)
                await subscription.loadInitialSnapshot();
            if (this.#restartReason !== null) {
                await subscription.restart(this.#restartReason);
                this.#restartReason = null;
            }
            if (this.#token === NOT_GIVEN && this.#options.getToken !== undefined) {
                this.#token = (await this.#options.getToken({ reason: "connect" })) ?? NOT_GIVEN;
            }
        }
        catch (error) {
            if (this.#state !== "connecting")
                return;
            this.emit("error", new ClientError("preparing the connection failed", undefined, { cause: error }));
            this.#retry(ABNORMAL_CLOSURE, "preparing the connection failed");
            return;
        }
        if (this.#state !== "connecting")
            return; // closed meanwhile
        const kind = this.#transport;
        const base = kind === "websocket" ? this.#options.url : this.#sseUrl;
        const url = new URL(base);
        url.searchParams.delete("epoch");
        url.searchParams.delete("last_seq");
        for (const [name, value] of Object.entries(subscription.resumeParams()))
            url.searchParams.set(name, value);
        if (this.#token !== NOT_GIVEN && this.#token !== undefined) {
            url.searchParams.set(this.#options.tokenParam ?? "token", this.#token);
        }
        this.stats.attempts += 1;
        let attempt = null;
        const handlers = {
            open: () => {
                if (attempt !== null)
                    attempt.opened = true;
            },
            message: (text) => {
                if (attempt !== null && this.#attempt === attempt)
                    this.#onMessage(attempt, text);
            },
            close: (code, reason) => {
                if (attempt !== null && this.#attempt === attempt)
                    this.#onClose(attempt, code, reason);
            },
        };
        try {
            const transport = kind === "websocket"
                ? openWebSocket(this.#WebSocket, url.toString(), handlers)
                : openEventSource(this.#EventSource, url.toString(), handlers);
            attempt = { transport, from: subscription.position, opened: false, welcome: null, epoch: null };
        }
        catch (error) {
            this.emit("error", new ClientError(`cannot open ${url.toString()}`, undefined, { cause: error }));
            this.#retry(ABNORMAL_CLOSURE, "cannot open the connection");
            return;
        }
        this.#attempt = attempt;
        const connectTimeout = this.#options.connectTimeout ?? 10000;
        this.#timers.connect = setTimeout(() => {
            if (this.#attempt === attempt)
                this.#drop(attempt, ABNORMAL_CLOSURE, `no welcome within ${connectTimeout} ms`);
        }, connectTimeout);
    }
    #onMessage(attempt, text) {
        this.#armDeadline();
        let decoded;
        try {
            decoded = decodeFrame(text);
        }
        catch (error) {
            this.emit("error", error instanceof FrameError ? error : new ClientError("bad frame", undefined, { cause: error }));
            return;
        }
        const subscription = this.#subscription;
        if ("event" in decoded) {
            if (attempt.epoch === null) {
                this.emit("error", new ClientError(`event seq ${decoded.event.seq} before the welcome: ignored`));
                return;
            }
            subscription.event(decoded.event, attempt.epoch);
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
    #onWelcome(attempt, welcome) {
        clearTimeout(this.#timers.connect);
        attempt.opened = true;
        attempt.welcome = welcome;
        attempt.epoch = welcome.epoch;
        this.#websocketFailures = 0;
        this.stats.welcomes += 1;
        if (welcome.resumed)
            this.stats.resumed += 1;
        this.#subscription.welcome(welcome);
        this.#timers.stable = setTimeout(() => {
            if (this.#attempt === attempt)
                this.#failures = 0;
        }, this.#options.stableAfter ?? 5000);
        if (attempt.transport.kind === "websocket")
            this.#startHeartbeat(attempt, welcome);
        this.#setState("connected");
        this.emit("connected", welcome);
    }
    // -- heartbeat -------------------------------------------------------------------------------------
    #pingPeriod(welcome) {
        return Math.max(100, this.#options.heartbeatInterval ?? welcome.heartbeat_interval * 1000);
    }
    #startHeartbeat(attempt, welcome) {
        const period = this.#pingPeriod(welcome);
        this.#timers.ping = setInterval(() => {
            if (this.#attempt === attempt)
                attempt.transport.send('{"type":"ping"}');
        }, period);
        this.#armDeadline();
    }
    /** Any frame proves the connection alive: push the deadline back. */
    #armDeadline() {
        const attempt = this.#attempt;
        if (attempt === null || attempt.welcome === null || attempt.transport.kind !== "websocket")
            return;
        clearTimeout(this.#timers.dead);
        const bound = this.#pingPeriod(attempt.welcome) + (this.#options.heartbeatTimeout ?? 10000);
        this.#timers.dead = setTimeout(() => {
            if (this.#attempt !== attempt)
                return;
            this.stats.heartbeatTimeouts += 1;
            this.#drop(attempt, ABNORMAL_CLOSURE, `no frame within ${bound} ms`);
        }, bound);
    }
    // -- disconnecting ---------------------------------------------------------------------------------
    /** Give up on `attempt` without waiting for a closing handshake, then handle it as closed with `code`. */
    #drop(attempt, code, reason) {
        attempt.transport.abandon();
        this.#onClose(attempt, code, reason);
    }
    #reconnect(reason) {
        const attempt = this.#attempt;
        if (this.#state === "closed")
            return;
        // Without a connection the client is already on its way to the next attempt, which resumes from the
        // subscription's current position.
        if (attempt !== null)
            this.#drop(attempt, ABNORMAL_CLOSURE, reason);
    }
    #onClose(attempt, code, reason) {
        this.#clearConnectionTimers();
        this.#attempt = null;
        if (attempt.transport.kind === "websocket" && !attempt.opened) {
            this.#websocketFailures += 1;
            const threshold = this.#options.sseFallbackAfter ?? 2;
            if (this.#websocketFailures >= threshold && this.#sseUrl !== null && this.#EventSource !== undefined) {
                this.#transport = "sse";
            }
        }
        if (code === SLOW_CONSUMER && attempt.from !== null && samePosition(attempt.from, this.#subscription.position)) {
            // Closed for falling behind before a single event was applied: the replay of what was missed is
            // larger than the server's queue bound, so resuming again would fail again. Reload instead.
            this.#stalledResumes += 1;
            if (this.#stalledResumes >= 2) {
                this.#stalledResumes = 0;
                this.#restartReason = "resume_overflow";
            }
        }
        else if (code === SLOW_CONSUMER) {
            this.#stalledResumes = 0;
        }
        const action = closeAction(code);
        if (action === "reconnect") {
            this.#retry(code, reason);
        }
        else if (action === "refresh-token" && this.#options.getToken !== undefined) {
            void this.#refreshToken(code, reason);
        }
        else {
            this.#refuse(code, reason);
        }
    }
    async #refreshToken(code, reason) {
        this.#setState("connecting");
        const previous = this.#token;
        let fresh;
        try {
            fresh = await this.#options.getToken({ reason: "refused", code, message: reason });
        }
        catch (error) {
            if (this.#state === "closed")
                return;
            this.emit("error", new ClientError("getToken failed", code, { cause: error }));
            this.#retry(code, reason); // ask again at the next attempt
            return;
        }
        if (this.#state === "closed")
            return;
        if (typeof fresh !== "string" || fresh === previous) {
            this.#refuse(code, reason);
            return;
        }
        this.#token = fresh;
        this.#retry(code, reason);
    }
    #refuse(code, reason) {
        this.emit("error", new ClientError(`the server ${code === 1000 ? "ended the stream" : "refused the connection"}: ${code} ${reason}`, code));
        this.emit("disconnect", { code, reason, retryIn: null, retry: 0 });
        this.#stop();
    }
    #retry(code, reason) {
        const delay = backoffDelay(this.#failures, this.#options.backoff);
        this.#failures += 1;
        this.#setState("waiting");
        this.emit("disconnect", { code, reason, retryIn: delay, retry: this.#failures });
        clearTimeout(this.#timers.retry);
        this.#timers.retry = setTimeout(() => {
            if (this.#state === "waiting")
                void this.#open();
        }, delay);
    }
    /** Skip the rest of the backoff delay (the page came back online or into view). */
    #retryNow() {
        if (this.#state !== "waiting")
            return;
        clearTimeout(this.#timers.retry);
        void this.#open();
    }
    #stop() {
        const attempt = this.#attempt;
        this.#attempt = null;
        this.#clearConnectionTimers();
        clearTimeout(this.#timers.retry);
        attempt?.transport.abandon();
        this.#removePageListeners?.();
        this.#removePageListeners = null;
        this.#setState("closed");
    }
    #clearConnectionTimers() {
        clearTimeout(this.#timers.connect);
        clearTimeout(this.#timers.stable);
        clearTimeout(this.#timers.dead);
        clearInterval(this.#timers.ping);
    }
    #setState(state) {
        if (this.#state === state)
            return;
        this.#state = state;
        this.emit("state", state);
    }
    /** In a browser: retry at once when the network or the page comes back, instead of at the end of the backoff. */
    #watchPage() {
        if (this.#options.retryOnResume === false)
            return;
        const g = globalThis;
        const win = g.window;
        const doc = g.document;
        if (typeof win?.addEventListener !== "function")
            return;
        const online = () => this.#retryNow();
        const visible = () => {
            if (doc?.visibilityState === "visible")
                this.#retryNow();
        };
        win.addEventListener("online", online);
        doc?.addEventListener?.("visibilitychange", visible);
        this.#removePageListeners = () => {
            win.removeEventListener?.("online", online);
            doc?.removeEventListener?.("visibilitychange", visible);
        };
    }
}
