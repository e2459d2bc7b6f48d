// Host stand: one restaurant's waitlist and tables, kept live over the service's WebSocket.
//
// How it stays exact (see the service README, "Snapshots, ETags and polling"):
//   1. GET the guest and table lists; keep their epoch and the lower of their two seqs.
//   2. Connect to /realtime with ?epoch=E&last_seq=N: the server replays every event after N, then live ones.
//   3. Apply events in seq order, ignoring any seq <= the last one applied; remember the last seq.
//   4. When the socket drops, reconnect with backoff and resume from the last seq applied.
//   5. On resync_required (history lost or trimmed), load the snapshot again and go back to 2.
// Writes go over HTTP and are not applied locally: the page changes when their event arrives, like any
// other device's. The page URL takes ?restaurant_id=... and an optional ?token=..., which is passed on
// as ?token= on the WebSocket and as a bearer token on HTTP requests.
(() => {
  "use strict";

  const GUEST_STATUSES = ["waiting", "notified", "seated", "completed", "cancelled", "no_show"];
  const WAITLIST = new Set(["waiting", "notified"]);
  const STATUS_LABELS = {
    waiting: "Waiting",
    notified: "Notified",
    seated: "Seated",
    completed: "Completed",
    cancelled: "Cancelled",
    no_show: "No-show",
    available: "Available",
    occupied: "Occupied",
    reserved: "Reserved",
    cleaning: "Cleaning",
    out_of_service: "Out of service",
  };
  const CONNECTION_LABELS = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    resyncing: "Reloading…",
    error: "Stopped",
  };
  const BACKOFF_INITIAL_MS = 250;
  const BACKOFF_MAX_MS = 8000;
  const REQUEST_TIMEOUT_MS = 10000;
  // Close codes after which retrying unchanged cannot help: 4003 forbidden (the token or the Origin was
  // refused), 4004 bad request (bad restaurant id or resume parameters). Reload the page to try again.
  const FATAL_CLOSE_CODES = new Set([4003, 4004]);

  const params = new URLSearchParams(window.location.search);
  const restaurantId = params.get("restaurant_id") || "test-restaurant-1";
  const token = params.get("token");
  const base = `/restaurants/${encodeURIComponent(restaurantId)}`;

  const model = {
    guests: new Map(), // id -> guest (wire field names: guestName, partySize, status, table_id)
    tables: new Map(), // id -> table (name, capacity, status, guest_id)
    epoch: null, // stream epoch of the data shown
    lastSeq: null, // seq of the last event applied (or of the snapshot)
  };
  const link = {
    socket: null,
    state: "connecting",
    attempt: 0, // reconnection attempts since the last welcome
    retryTimer: null,
    heartbeatTimer: null,
    lastMessageAt: 0,
    generation: 0, // bumped by every snapshot load; work begun under an older one is dropped
    queue: [], // received events not applied yet, in seq order
    applying: false,
  };
  // Counters, for people and for the browser tests.
  const stats = { snapshots: 0, connects: 0, welcomes: 0, resumed: 0, resyncs: 0, applied: 0 };
  window.hostStand = { model, link, stats, restaurantId };

  const $ = (id) => document.getElementById(id);

  // -- HTTP ---------------------------------------------------------------------------------------

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const payload = await response.json();
        detail = typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail);
      } catch (_) {
        // not JSON: keep the status text
      }
      const error = new Error(`${method} ${path}: ${response.status} ${detail}`);
      error.status = response.status;
      throw error;
    }
    return response.status === 204 ? null : response.json();
  }

  function showMessage(text) {
    const message = $("message");
    message.textContent = text || "";
    message.hidden = !text;
  }

  async function write(method, path, body) {
    try {
      showMessage("");
      return await api(method, path, body);
    } catch (error) {
      showMessage(error.message);
      render(); // put controls back to what the model says
      return null;
    }
  }

  // -- snapshot -----------------------------------------------------------------------------------

  // Returns false when a newer load started meanwhile (that one carries on).
  async function loadSnapshot() {
    const generation = ++link.generation;
    link.queue = [];
    const [guests, tables] = await Promise.all([api("GET", `${base}/guests`), api("GET", `${base}/tables`)]);
    if (generation !== link.generation) return false;
    if (guests.epoch == null || guests.epoch !== tables.epoch) {
      // The broadcast backend is unreachable (or changed between the two reads): no position to resume from.
      throw new Error("the service has no stream position to offer; retrying");
    }
    model.guests = new Map(guests.guests.map((guest) => [guest.id, guest]));
    model.tables = new Map(tables.tables.map((table) => [table.id, table]));
    model.epoch = guests.epoch;
    model.lastSeq = Math.min(guests.seq, tables.seq);
    stats.snapshots += 1;
    render();
    return true;
  }

  // -- WebSocket ----------------------------------------------------------------------------------

  function setState(state, detail) {
    link.state = state;
    const badge = $("connection");
    badge.dataset.state = state;
    badge.textContent = CONNECTION_LABELS[state] + (detail ? ` ${detail}` : "");
  }

  function socketUrl() {
    const query = new URLSearchParams({ restaurant_id: restaurantId });
    if (model.epoch != null) {
      query.set("epoch", model.epoch);
      query.set("last_seq", String(model.lastSeq));
    }
    if (token) query.set("token", token);
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${window.location.host}/realtime?${query}`;
  }

  function connect() {
    clearTimeout(link.retryTimer);
    link.retryTimer = null;
    dropSocket();
    const socket = new WebSocket(socketUrl());
    link.socket = socket;
    link.lastMessageAt = Date.now();
    stats.connects += 1;
    socket.onmessage = (message) => {
      if (link.socket !== socket) return;
      link.lastMessageAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (_) {
        console.warn("host stand: ignoring a frame that is not JSON", message.data);
        return;
      }
      onFrame(frame);
    };
    socket.onclose = (event) => {
      if (link.socket !== socket) return; // closed on purpose, already replaced
      link.socket = null;
      stopHeartbeat();
      if (FATAL_CLOSE_CODES.has(event.code)) {
        setState("error", `(${event.code} ${event.reason || "refused"})`);
        return;
      }
      scheduleReconnect();
    };
  }

  function dropSocket() {
    const socket = link.socket;
    link.socket = null;
    stopHeartbeat();
    if (socket) socket.close(1000, "client reloading");
  }

  function scheduleReconnect() {
    if (link.retryTimer !== null) return;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * 2 ** link.attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    link.attempt += 1;
    setState("reconnecting", link.attempt > 1 ? `(attempt ${link.attempt})` : "");
    link.retryTimer = setTimeout(() => {
      link.retryTimer = null;
      // Without a position (the first snapshot never loaded), start from a snapshot; otherwise resume.
      if (model.epoch == null) start();
      else connect();
    }, delay);
  }

  function start() {
    const generation = link.generation + 1;
    loadSnapshot().then(
      (current) => {
        if (current) connect();
      },
      (error) => {
        console.warn("host stand: snapshot failed:", error.message);
        if (generation !== link.generation) return;
        if (error.status >= 400 && error.status < 500 && error.status !== 408 && error.status !== 429) {
          // Refused (bad restaurant id, not allowed): asking again unchanged cannot help.
          setState("error", `(${error.status})`);
          showMessage(error.message);
          return;
        }
        scheduleReconnect();
      },
    );
  }

  function resync() {
    stats.resyncs += 1;
    dropSocket();
    setState("resyncing");
    start();
  }

  function startHeartbeat(intervalSeconds) {
    stopHeartbeat();
    const every = Math.min(Math.max(intervalSeconds || 25, 5), 25) * 1000;
    link.heartbeatTimer = setInterval(() => {
      const socket = link.socket;
      if (!socket || socket.readyState !== WebSocket.OPEN) return;
      if (Date.now() - link.lastMessageAt > 2 * every) {
        socket.close(4000, "no answer to pings"); // onclose reconnects
        return;
      }
      socket.send(JSON.stringify({ type: "ping" }));
    }, every);
  }

  function stopHeartbeat() {
    clearInterval(link.heartbeatTimer);
    link.heartbeatTimer = null;
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "welcome":
        stats.welcomes += 1;
        if (frame.resumed) stats.resumed += 1;
        link.attempt = 0;
        setState("live");
        startHeartbeat(frame.heartbeat_interval);
        return; // when the resume failed, resync_required follows
      case "resync_required":
        resync();
        return;
      case "pong":
        return;
      case "error":
        console.warn("host stand: the server refused a frame:", frame);
        return;
      default:
        if (typeof frame.seq !== "number") {
          console.warn("host stand: ignoring a frame without seq", frame);
          return;
        }
        enqueue(frame);
    }
  }

  // -- events -------------------------------------------------------------------------------------

  function enqueue(event) {
    if (model.lastSeq !== null && event.seq <= model.lastSeq) return;
    const queue = link.queue;
    let index = queue.length;
    while (index > 0 && queue[index - 1].seq > event.seq) index -= 1;
    if (index > 0 && queue[index - 1].seq === event.seq) return; // already queued (a replay)
    queue.splice(index, 0, event);
    drain();
  }

  async function drain() {
    if (link.applying) return;
    link.applying = true;
    try {
      while (link.queue.length) {
        const generation = link.generation;
        const event = link.queue.shift();
        if (event.seq <= model.lastSeq) continue;
        try {
          await apply(event);
        } catch (error) {
          // Reloading the affected entities failed (the service went away): start over from a snapshot.
          console.warn("host stand: could not apply event", event.seq, error.message);
          if (generation === link.generation) resync();
          return;
        }
        if (generation !== link.generation) return; // a snapshot replaced everything meanwhile
        model.lastSeq = event.seq;
        stats.applied += 1;
        render();
      }
    } finally {
      link.applying = false;
      // Events queued while this run was waiting, under a newer snapshot, still need a run.
      if (link.queue.length) queueMicrotask(drain);
    }
  }

  function merge(map, id, data) {
    map.set(id, { ...(map.get(id) || {}), ...data });
  }

  async function apply(event) {
    const data = event.data || {};
    switch (event.type) {
      case "guest_created":
      case "guest_updated":
        merge(model.guests, event.guest_id, data);
        if (event.type === "guest_updated" && model.guests.get(event.guest_id).guestName === undefined) {
          await reload(event.guest_id); // a guest this page never saw: fetch the rest of it
        }
        return;
      case "guest_deleted":
        model.guests.delete(event.guest_id);
        return;
      case "table_created":
      case "table_updated":
        merge(model.tables, event.table_id, data);
        if (event.type === "table_updated" && model.tables.get(event.table_id).name === undefined) {
          await reload(event.table_id);
        }
        return;
      case "atomic_transaction_complete":
        // No per-entity events for a transaction: reload what it changed.
        await Promise.all(event.affected_entities.map(reload));
        return;
      default:
        console.warn("host stand: unknown event type", event.type);
    }
  }

  async function reload(id) {
    const kind = id.startsWith("table-") ? "tables" : "guests";
    const map = kind === "tables" ? model.tables : model.guests;
    try {
      map.set(id, await api("GET", `${base}/${kind}/${encodeURIComponent(id)}`));
    } catch (error) {
      if (error.status !== 404) throw error;
      map.delete(id); // deleted since; its own event follows
    }
  }

  // -- actions ------------------------------------------------------------------------------------

  function addWalkIn(event) {
    event.preventDefault();
    const name = $("walk-in-name");
    const size = $("walk-in-size");
    const button = $("walk-in-add");
    button.disabled = true;
    write("POST", `${base}/guests`, { guestName: name.value, partySize: Number(size.value) })
      .then((guest) => {
        if (guest) {
          name.value = "";
          name.focus();
        }
      })
      .finally(() => {
        button.disabled = false;
      });
  }

  function changeStatus(guestId, status) {
    write("PUT", `${base}/guests/${encodeURIComponent(guestId)}`, { status });
  }

  function seat(guestId, tableId) {
    return write("POST", "/transactions/atomic", {
      restaurant_id: restaurantId,
      operations: [
        { op: "update_guest", guest_id: guestId, changes: { status: "seated", table_id: tableId } },
        { op: "update_table", table_id: tableId, changes: { status: "occupied", guest_id: guestId } },
      ],
    });
  }

  function clearTable(table) {
    const operations = [{ op: "update_table", table_id: table.id, changes: { status: "available", guest_id: null } }];
    if (table.guest_id && model.guests.has(table.guest_id)) {
      operations.push({ op: "update_guest", guest_id: table.guest_id, changes: { status: "completed" } });
    }
    write("POST", "/transactions/atomic", { restaurant_id: restaurantId, operations });
  }

  // -- rendering ----------------------------------------------------------------------------------
  // Rows and cards are kept per id and updated in place, so a select someone is using keeps its value.

  const guestRows = new Map();
  const tableCards = new Map();

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function guestRow(guestId) {
    let row = guestRows.get(guestId);
    if (row) return row;
    row = element("tr");
    row.dataset.guestId = guestId;
    const status = element("select", "status-select");
    status.setAttribute("aria-label", "Guest status");
    for (const value of GUEST_STATUSES) status.append(new Option(STATUS_LABELS[value], value));
    status.addEventListener("change", () => changeStatus(guestId, status.value));
    const tableSelect = element("select", "seat-table");
    tableSelect.setAttribute("aria-label", "Table");
    const seatButton = element("button", "seat-button", "Seat");
    seatButton.type = "button";
    seatButton.addEventListener("click", () => {
      if (!tableSelect.value) {
        showMessage("Choose a table first.");
        return;
      }
      seatButton.disabled = true;
      seat(guestId, tableSelect.value).finally(() => {
        seatButton.disabled = false;
      });
    });
    const seatCell = element("div", "seat");
    seatCell.append(tableSelect, seatButton);
    const tableName = element("span", "table-name");
    const cells = [element("td", "name"), element("td", "party"), element("td", "status"), element("td", "table")];
    cells[2].append(status);
    cells[3].append(seatCell, tableName);
    row.append(...cells);
    row.parts = { cells, status, tableSelect, seatCell, tableName, optionsKey: null };
    guestRows.set(guestId, row);
    return row;
  }

  function updateGuestRow(row, guest, freeTables) {
    const parts = row.parts;
    row.dataset.status = guest.status;
    parts.cells[0].textContent = guest.guestName ?? "…";
    parts.cells[1].textContent = guest.partySize ?? "";
    parts.status.value = guest.status; // a choice shows once its event is back (or reverts if refused)
    const waiting = WAITLIST.has(guest.status);
    parts.seatCell.hidden = !waiting;
    parts.tableName.hidden = waiting;
    const table = guest.table_id ? model.tables.get(guest.table_id) : null;
    parts.tableName.textContent = table ? table.name : guest.table_id ? "?" : "—";
    if (waiting) {
      const key = freeTables.map((t) => `${t.id}:${t.name}:${t.capacity}`).join("|");
      if (key !== parts.optionsKey) {
        const chosen = parts.tableSelect.value;
        const options = [new Option(freeTables.length ? "Choose a table" : "No free table", "")];
        for (const t of freeTables) options.push(new Option(`${t.name} (${t.capacity})`, t.id));
        parts.tableSelect.replaceChildren(...options);
        if (freeTables.some((t) => t.id === chosen)) parts.tableSelect.value = chosen;
        parts.optionsKey = key;
      }
    }
  }

  function tableCard(tableId) {
    let card = tableCards.get(tableId);
    if (card) return card;
    card = element("li");
    card.dataset.tableId = tableId;
    const clear = element("button", "secondary clear-button");
    clear.type = "button";
    clear.addEventListener("click", () => {
      const table = model.tables.get(tableId);
      if (table) clearTable(table);
    });
    const parts = {
      name: element("span", "table-name"),
      capacity: element("span", "table-capacity"),
      status: element("span", "table-status"),
      guest: element("span", "table-guest"),
      clear,
    };
    card.append(parts.name, parts.capacity, parts.status, parts.guest, clear);
    card.parts = parts;
    tableCards.set(tableId, card);
    return card;
  }

  function updateTableCard(card, table) {
    const parts = card.parts;
    card.dataset.status = table.status;
    parts.name.textContent = table.name ?? "…";
    parts.capacity.textContent = table.capacity ? `${table.capacity} seats` : "";
    parts.status.textContent = STATUS_LABELS[table.status] || table.status;
    const guest = table.guest_id ? model.guests.get(table.guest_id) : null;
    parts.guest.textContent = guest ? `${guest.guestName} (${guest.partySize})` : "";
    parts.clear.hidden = table.status === "available" && !table.guest_id;
    parts.clear.textContent = table.status === "occupied" || table.guest_id ? "Clear table" : "Available";
  }

  function sync(container, rows, ids) {
    // Remove rows of entities that are gone or elsewhere; append the rest in order (moves keep state).
    const wanted = new Set(ids);
    for (const child of [...container.children]) {
      if (!wanted.has(child.dataset.guestId ?? child.dataset.tableId)) child.remove();
    }
    ids.forEach((id, index) => {
      const node = rows.get(id);
      if (container.children[index] !== node) container.insertBefore(node, container.children[index] || null);
    });
  }

  function render() {
    $("restaurant").textContent = restaurantId;
    $("position").textContent = model.epoch ? `seq ${model.lastSeq}` : "";
    document.body.dataset.seq = model.lastSeq ?? "";

    const tables = [...model.tables.values()];
    const freeTables = tables.filter((t) => t.status === "available" && !t.guest_id);
    const guests = [...model.guests.values()];
    for (const [id, row] of guestRows) if (!model.guests.has(id)) guestRows.delete(id) && row.remove();
    for (const [id, card] of tableCards) if (!model.tables.has(id)) tableCards.delete(id) && card.remove();

    const waitlist = [];
    const done = [];
    for (const guest of guests) {
      updateGuestRow(guestRow(guest.id), guest, freeTables);
      (WAITLIST.has(guest.status) ? waitlist : done).push(guest.id);
    }
    for (const table of tables) updateTableCard(tableCard(table.id), table);

    sync($("waitlist"), guestRows, waitlist);
    sync($("done"), guestRows, done);
    sync($("tables"), tableCards, tables.map((t) => t.id));
    $("waitlist-count").textContent = waitlist.length ? `(${waitlist.length})` : "";
    $("done-count").textContent = done.length ? `(${done.length})` : "";
    const occupied = tables.filter((t) => t.status === "occupied").length;
    $("tables-count").textContent = tables.length ? `(${occupied}/${tables.length} occupied)` : "";
    $("waitlist-empty").hidden = waitlist.length > 0;
    $("done-empty").hidden = done.length > 0;
    $("tables-empty").hidden = tables.length > 0;
  }

  // -- start --------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("walk-in-form").addEventListener("submit", addWalkIn);
    // Back online, or back in front of someone (browsers slow down timers in background tabs): retry now
    // rather than at the end of the current backoff.
    const retryNow = () => {
      if (link.retryTimer === null) return;
      clearTimeout(link.retryTimer);
      link.retryTimer = null;
      if (model.epoch == null) start();
      else connect();
    };
    window.addEventListener("online", retryNow);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") retryNow();
    });
    setState("connecting");
    render();
    start();
  });
})();
