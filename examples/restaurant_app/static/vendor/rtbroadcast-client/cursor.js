// The sans-I/O part of the client: where a subscription stands in its channel's stream, what to do with
// the next event, and how long to wait before the next attempt. No timers, no sockets: plain functions
// and one small class, tested on their own (test/cursor.test.js).
/**
 * One subscription's position in one channel's stream.
 *
 * Events are applied in seq order: the next one is applied, an older one (or the same one again, as a
 * replay) is dropped, and one that skips a seq reveals a gap.
 */
export class Cursor {
    position;
    constructor(position = null) {
        this.position = position === null ? null : checkPosition(position);
    }
    /** Judge an event at `seq`; `null` when there is no position yet (the welcome sets it). */
    judge(seq) {
        if (this.position === null)
            return null;
        if (seq <= this.position.seq)
            return "duplicate";
        if (seq === this.position.seq + 1)
            return "apply";
        return "gap";
    }
    /** Record that the event at `seq` was applied. */
    advance(seq) {
        if (this.position === null)
            throw new Error("advance() before the cursor has a position");
        this.position = { epoch: this.position.epoch, seq };
    }
    /** Move to `position` (a welcome without resume, or a snapshot after a resync). */
    reset(position) {
        this.position = checkPosition(position);
    }
    /** The query parameters that resume from here, or none without a position. */
    resumeParams() {
        if (this.position === null)
            return {};
        return { epoch: this.position.epoch, last_seq: String(this.position.seq) };
    }
}
/** Return `value` as a {@link Position}, or throw a `TypeError` saying what is wrong with it. */
export function checkPosition(value) {
    if (typeof value !== "object" || value === null) {
        throw new TypeError(`a stream position must be an object {epoch, seq}, not ${String(value)}`);
    }
    const { epoch, seq } = value;
    if (typeof epoch !== "string" || epoch === "" || epoch.length > 128) {
        throw new TypeError(`a stream position needs a non-empty string epoch (at most 128 characters)`);
    }
    if (typeof seq !== "number" || !Number.isSafeInteger(seq) || seq < 0) {
        throw new TypeError(`a stream position needs a non-negative integer seq, not ${String(seq)}`);
    }
    return { epoch, seq };
}
/**
 * Delay before retry number `attempt` (0 for the first retry) with "full jitter": uniformly random
 * between 0 and min(maxDelay, initialDelay * multiplier ** attempt), so that clients dropped at the same
 * moment come back spread over the window instead of all at once.
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
    const ceiling = backoffCeiling(attempt, options);
    return Math.floor(random() * ceiling);
}
/** The upper bound of {@link backoffDelay} for `attempt`. */
export function backoffCeiling(attempt, options = {}) {
    const initial = options.initialDelay ?? 500;
    const max = options.maxDelay ?? 10000;
    const multiplier = options.multiplier ?? 2;
    return Math.min(max, initial * multiplier ** Math.max(0, attempt));
}
/** Close codes after which the same request cannot succeed (see the protocol's close-code table). */
export const FORBIDDEN = 4003;
export const BAD_REQUEST = 4004;
/** The server ended the connection on purpose: do not reconnect. */
export const NORMAL_CLOSURE = 1000;
/** Decide what a close code means for the client (the protocol's close-code table, in one place). */
export function closeAction(code) {
    if (code === FORBIDDEN)
        return "refresh-token";
    if (code === BAD_REQUEST || code === NORMAL_CLOSURE)
        return "stop";
    return "reconnect";
}
