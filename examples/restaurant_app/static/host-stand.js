// Host stand: one restaurant's waitlist and tables, kept live over the service's WebSocket.
//
// The connection is @rtbroadcast/client (clients/js in the repository; its built ES module is served
// from vendor/rtbroadcast-client/, copied there by `npm run vendor`). The client does what keeps the page
// exact (see the service README, "Snapshots, ETags and polling"): it loads the snapshot through the page's
// `resync` callback, connects with its epoch and seq so the server replays what was published since,
// applies events in seq order once each, reconnects with backoff and resumes from the last event applied,
// and calls `resync` again when the server says resync_required (history lost or trimmed).
// Writes go over HTTP and are not applied locally: the page changes when their event arrives, like any
// other device's. The page URL takes ?restaurant_id=... and an optional ?token=..., which is passed on
// as ?token= on the WebSocket and as a bearer token on HTTP requests.
//
// The page speaks protocol 2 (`?protocol=2`): one connection carries the restaurant's channel, asked
// with `presence: true` so that the page lists the devices online at the restaurant (a snapshot on every
// subscribe, then one frame per join or leave; who each device is comes from its token, on the server),
// and the page's own device channel, which the server subscribes it to and where the manager's direct
// messages arrive. The restaurant's events are the same frames as on protocol 1, wrapped per channel.
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
  // Reconnect delays: full jitter below a ceiling that starts at 250 ms and doubles up to 8 s.
  const BACKOFF = { initialDelay: 250, maxDelay: 8000 };
  const REQUEST_TIMEOUT_MS = 10000;
  // After 4003 (the token or the Origin was refused) and 4004 (bad restaurant id or resume parameters)
  // the client stops: retrying unchanged cannot help. Reload the page to try again.

  const params = new URLSearchParams(window.location.search);
  const restaurantId = params.get("restaurant_id") || "test-restaurant-1";
  const token = params.get("token");
  const base = `/restaurants/${encodeURIComponent(restaurantId)}`;
  const channel = `restaurant:${restaurantId}`;
  // This device's id, read (not verified: for display only) from its token's `sub`.
  const ownDevice = (() => {
    try {
      const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(payload)).sub ?? null;
    } catch (_) {
      return null;
    }
  })();

  const model = {
    guests: new Map(), // id -> guest (wire field names: guestName, partySize, status, table_id)
    tables: new Map(), // id -> table (name, capacity, status, guest_id)
    epoch: null, // stream epoch of the data shown
    lastSeq: null, // seq of the last event applied (or of the snapshot)
    presence: null, // who is online at the restaurant: {count, members, truncated}, or null (not known)
    messages: [], // direct messages to this device, newest last: {text, sender, timestamp}
  };
  const link = {
    client: null, // the @rtbroadcast/client Client, once the module is loaded
    subscription: null,
    state: "connecting", // what the badge shows
    get queue() {
      // Received events not applied yet, in seq order.
      return link.subscription?.pending ?? [];
    },
  };
  // Counters, for people and for the browser tests: the page's own (snapshots loaded, resyncs run,
  // events applied) and the client's (connection attempts, welcomes, resumed welcomes).
  const counts = { snapshots: 0, resyncs: 0, applied: 0 };
  const stats = {
    get snapshots() {
      return counts.snapshots;
    },
    get connects() {
      return link.client?.stats.attempts ?? 0;
    },
    get welcomes() {
      return link.client?.stats.welcomes ?? 0;
    },
    get resumed() {
      return link.client?.stats.resumed ?? 0;
    },
    get resyncs() {
      return counts.resyncs;
    },
    get applied() {
      return counts.applied;
    },
  };
  window.hostStand = { model, link, stats, restaurantId, sendMessage };

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

  // The subscription's `resync` callback: load both lists, show them, and return the stream position
  // they reflect (the lower of their two seqs: events the later read already holds apply again harmlessly,
  // as each one merges the entity's new fields).
  const fetchLists = () => Promise.all([api("GET", `${base}/guests`), api("GET", `${base}/tables`)]);
  // The first snapshot's requests start while the client module loads (see start()).
  let firstLists = null;

  async function loadSnapshot(info) {
    if (info.reason !== "initial") counts.resyncs += 1;
    const lists = info.reason === "initial" && firstLists !== null ? firstLists : fetchLists();
    firstLists = null;
    let guests;
    let tables;
    try {
      [guests, tables] = await lists;
    } catch (error) {
      console.warn("host stand: snapshot failed:", error.message);
      if (error.status >= 400 && error.status < 500 && error.status !== 408 && error.status !== 429) {
        // Refused (bad restaurant id, not allowed): asking again unchanged cannot help.
        link.client.close();
        setState("error", `(${error.status})`);
        showMessage(error.message);
      }
      throw error; // otherwise the client retries after a backoff
    }
    if (guests.epoch == null || guests.epoch !== tables.epoch) {
      // The broadcast backend is unreachable (or changed between the two reads): no position to resume from.
      throw new Error("the service has no stream position to offer; retrying");
    }
    model.guests = new Map(guests.guests.map((guest) => [guest.id, guest]));
    model.tables = new Map(tables.tables.map((table) => [table.id, table]));
    model.epoch = guests.epoch;
    model.lastSeq = Math.min(guests.seq, tables.seq);
    counts.snapshots += 1;
    render();
    return { epoch: model.epoch, seq: model.lastSeq };
  }

  // -- connection ---------------------------------------------------------------------------------

  function setState(state, detail) {
    if (link.state === "error") return; // stopped: stays so
    link.state = state;
    const badge = $("connection");
    badge.dataset.state = state;
    badge.textContent = CONNECTION_LABELS[state] + (detail ? ` ${detail}` : "");
  }

  async function start() {
    firstLists = fetchLists();
    firstLists.catch(() => {}); // handled by loadSnapshot; not an unhandled rejection meanwhile
    let Client;
    try {
      ({ Client } = await import("./vendor/rtbroadcast-client/index.js"));
    } catch (error) {
      setState("error", "(the client module did not load)");
      showMessage(String(error));
      return;
    }
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${window.location.host}/realtime`;
    const client = new Client({
      url,
      protocol: 2,
      // The server subscribes the page to its own device channel (device:<restaurant>:<device>).
      serverSubscription: () => ({ onEvent: receiveDeviceEvent }),
      ...(token ? { token } : {}),
      backoff: BACKOFF,
      // WebSocket only, as before: the SSE fallback would stay on SSE after a server outage, without the
      // heartbeat, and a 4003 over SSE cannot be told from an outage.
      sseUrl: null,
    });
    const subscription = client.subscribe({ channel, presence: true, resync: loadSnapshot, onEvent: applyEvent });
    link.client = client;
    link.subscription = subscription;
    let dropped = false; // once the first connection (or attempt) is gone, "connecting" reads "reconnecting"
    let retry = 0;
    client.on("state", (state) => {
      if (state === "connected") setState(subscription.state === "resyncing" ? "resyncing" : "live");
      else if (state === "connecting" || state === "waiting") {
        if (dropped) setState("reconnecting", retry > 1 ? `(attempt ${retry})` : "");
        else setState("connecting");
      }
    });
    client.on("disconnect", (info) => {
      dropped = true;
      retry = info.retry;
      if (info.retryIn === null) setState("error", `(${info.code} ${info.reason || "refused"})`);
      else setState("reconnecting", retry > 1 ? `(attempt ${retry})` : "");
    });
    client.on("connected", () => {
      retry = 0;
    });
    client.on("error", (error) => console.warn("host stand:", error.message, error.cause ?? ""));
    subscription.on("state", (state) => {
      if (state === "resyncing") setState("resyncing");
      else if (state === "live" && client.state === "connected") setState("live");
    });
    subscription.on("presence", ({ presence }) => {
      model.presence = presence;
      renderDevices();
    });
    subscription.on("error", (error) => {
      if (error.reason === "presence_unavailable") {
        model.presence = null;
        renderDevices("Presence is not available on this service.");
      } else if (error.reason !== "try_again_later") {
        // The restaurant's channel was refused on this connection: nothing more can arrive.
        client.close();
        setState("error", `(${error.reason})`);
        showMessage(error.message);
      }
    });
    client.on("disconnect", () => {
      model.presence = null; // stale until the next snapshot
      renderDevices();
    });
    subscription.on("position", (position) => {
      model.epoch = position.epoch;
      model.lastSeq = position.seq;
      render();
    });
    client.connect();
  }

  // -- events -------------------------------------------------------------------------------------

  // The subscription's `onEvent`: the client calls it once per event, in seq order, and waits for it.
  async function applyEvent(event) {
    try {
      await apply(event);
    } catch (error) {
      // Reloading the affected entities failed (the service went away): start over from a snapshot.
      console.warn("host stand: could not apply event", event.seq, error.message);
      link.subscription.resync();
      return;
    }
    counts.applied += 1;
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

  // -- the device channel: direct messages ---------------------------------------------------------

  function receiveDeviceEvent(event) {
    if (event.type !== "device_message") {
      console.warn("host stand: unknown device event", event.type);
      return;
    }
    model.messages.push({ text: event.text, sender: event.sender, timestamp: event.timestamp });
    if (model.messages.length > 20) model.messages.shift();
    renderMessages();
  }

  // Send a direct message to a device of the restaurant (its device channel), over HTTP.
  function sendMessage(deviceId, text) {
    return write("POST", `${base}/devices/${encodeURIComponent(deviceId)}/messages`, { text });
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

  function renderDevices(note) {
    const list = $("devices");
    const presence = model.presence;
    const members = presence ? presence.members : [];
    const items = members.map((member) => {
      const item = element("li");
      item.dataset.client = member.client;
      if (member.identity != null) item.dataset.device = member.identity;
      const name = member.info && typeof member.info.name === "string" ? member.info.name : null;
      item.append(element("span", "device-name", name ?? member.identity ?? "Anonymous device"));
      if (member.identity != null && member.identity === ownDevice) {
        item.append(element("span", "device-self", " (this device)"));
      } else if (member.identity != null) {
        const button = element("button", "secondary message-button", "Message");
        button.type = "button";
        button.addEventListener("click", () => {
          const text = window.prompt(`Message to ${name ?? member.identity}`);
          if (text) sendMessage(member.identity, text);
        });
        item.append(button);
      }
      return item;
    });
    list.replaceChildren(...items);
    $("devices-count").textContent = presence ? `(${presence.count})` : "";
    const empty = $("devices-empty");
    empty.textContent = note ?? (presence ? "No device online." : "Not connected.");
    empty.hidden = items.length > 0;
    $("devices-truncated").hidden = !(presence && presence.truncated);
  }

  function renderMessages() {
    const items = model.messages.map((message) => {
      const item = element("li", "device-message", message.text);
      if (message.sender) item.title = `from ${message.sender}`;
      return item;
    });
    $("device-messages").replaceChildren(...items.reverse());
    $("device-messages-section").hidden = items.length === 0;
  }

  // -- start --------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("walk-in-form").addEventListener("submit", addWalkIn);
    // The client also retries at once when the browser is back online or the page visible again,
    // rather than at the end of its current backoff (browsers slow timers down in background tabs).
    setState("connecting");
    render();
    start();
  });
})();
