// The two ways to reach a stream: a WebSocket, or Server-Sent Events where WebSocket is unavailable.
// Each turns its platform object into three callbacks; everything else lives in the client.
const OPEN = 1;
/** A dropped connection: what browsers report when no close frame arrived. */
export const ABNORMAL_CLOSURE = 1006;
export function openWebSocket(Ctor, url, handlers) {
    const socket = new Ctor(url);
    let done = false;
    let opened = false;
    const finish = (code, reason) => {
        if (done)
            return;
        done = true;
        detach();
        handlers.close(code, reason);
    };
    const detach = () => {
        socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    };
    socket.onopen = () => {
        opened = true;
        if (!done)
            handlers.open();
    };
    socket.onmessage = (event) => {
        if (done)
            return;
        if (typeof event.data === "string")
            handlers.message(event.data);
        // Protocol 1 sends text frames only; a binary frame is not ours to interpret.
    };
    socket.onclose = (event) => finish(event.code || ABNORMAL_CLOSURE, event.reason || "");
    socket.onerror = () => {
        // After an open socket's error, a close event with the code follows. A handshake that fails gets an
        // error and (in browsers) a close with 1006; Node 20's WebSocket sends no close then, so end here.
        if (!opened)
            finish(ABNORMAL_CLOSURE, "connection failed");
    };
    return {
        kind: "websocket",
        send(text) {
            if (done || socket.readyState !== OPEN)
                return false;
            socket.send(text);
            return true;
        },
        abandon() {
            if (done)
                return;
            done = true;
            detach();
            // Do not wait for the closing handshake: a dead peer never completes it. 1000 is one of the two
            // codes (with 3000-4999) a browser lets a page send.
            try {
                socket.close(1000, "client closing");
            }
            catch {
                // already closed
            }
        },
    };
}
export function openEventSource(Ctor, url, handlers) {
    const source = new Ctor(url);
    let done = false;
    const stop = () => {
        done = true;
        source.onopen = source.onmessage = source.onerror = null;
        source.close();
    };
    source.onopen = () => {
        if (!done)
            handlers.open();
    };
    source.onmessage = (event) => {
        if (!done)
            handlers.message(event.data);
    };
    source.onerror = () => {
        if (done)
            return;
        // EventSource would reconnect by itself (or, after a refusal, give up without saying why). The
        // client reconnects instead, so that it controls the backoff and resumes from the last event it
        // applied rather than from the last one received.
        stop();
        handlers.close(ABNORMAL_CLOSURE, "event stream failed");
    };
    return {
        kind: "sse",
        send() {
            return false;
        },
        abandon() {
            if (!done)
                stop();
        },
    };
}
/** The SSE address that goes with a WebSocket address: `ws(s)://host/path?q` -> `http(s)://host/path/sse?q`. */
export function sseUrlFor(websocketUrl) {
    const url = new URL(websocketUrl);
    if (url.protocol === "ws:")
        url.protocol = "http:";
    else if (url.protocol === "wss:")
        url.protocol = "https:";
    else
        return null;
    url.pathname = url.pathname.replace(/\/+$/, "") + "/sse";
    return url.toString();
}
