// Compile-time checks of the public types, from a caller's side: `npm test` type-checks this file
// (it is never run). A line marked @ts-expect-error must fail to compile, or tsc reports it.

import { Client, type Position, type Received } from "../dist/index.js";

type ChatEvent =
  | { type: "message_posted"; room: string; author: string; text: string }
  | { type: "message_deleted"; room: string; id: string };

const client = new Client<ChatEvent>({ url: "ws://127.0.0.1:8000/realtime?room=lobby" });
const subscription = client.subscribe({
  resync: async (): Promise<Position> => ({ epoch: "e", seq: 0 }),
  onEvent(event) {
    const seq: number = event.seq;
    if (event.type === "message_posted") {
      const text: string = event.text; // narrowed by the discriminant
      void text;
    } else {
      const id: string = event.id;
      void id;
    }
    // @ts-expect-error: no such event type in the union
    if (event.type === "nope") return;
    void seq;
  },
});
subscription.on("event", (event: Received<ChatEvent>) => void event.room);
const position: Position | null = subscription.position;
void position;

// @ts-expect-error: a resync callback must return a position
client.subscribe({ resync: async () => "not a position" });

// @ts-expect-error: the URL is required
new Client({});

// The example service's generated types (examples/restaurant-events.ts, from its AsyncAPI document).
import type { GuestUpdatedData, ServiceEvent, ServiceEventMap } from "../examples/restaurant-events.js";

const restaurant = new Client<ServiceEvent>({ url: "ws://127.0.0.1:8000/realtime?restaurant_id=r1" });
restaurant.subscribe({
  onEvent(event) {
    switch (event.type) {
      case "guest_updated": {
        const data: GuestUpdatedData = event.data;
        const table: string | null = data.table_id;
        // @ts-expect-error: partySize may be absent from an update
        const size: number = data.partySize;
        void table, size;
        return;
      }
      case "atomic_transaction_complete": {
        const ids: string[] = event.affected_entities;
        void ids;
        return;
      }
      default: {
        const seq: number = event.seq;
        void seq;
      }
    }
  },
});
const created: ServiceEventMap["guest_created"]["data"]["guestName"] = "Ada";
void created;

// Protocol 2: several subscriptions, server-side ones, presence.
import { SubscriptionError, type PresenceUpdate, type Subscription } from "../dist/index.js";

const multi = new Client<ChatEvent>({
  url: "ws://127.0.0.1:8000/realtime",
  protocol: 2,
  serverSubscription: (channel) => ({ onEvent: (event) => void [channel, event.seq] }),
});
const lobby = multi.subscribe({ channel: "room:lobby", presence: true, onEvent: (event) => void event.type });
lobby.on("presence", (update: PresenceUpdate) => {
  const count: number = update.presence.count;
  const who: string | null = update.member?.identity ?? null;
  void count, who;
});
lobby.on("error", (error: SubscriptionError) => void error.reason);
multi.on("subscription", (subscription: Subscription<ChatEvent>) => void subscription.serverSide);
multi.on("unsubscribed", (subscription, reason: string) => void [subscription.channel, reason]);
lobby.unsubscribe();

// @ts-expect-error: protocol 1 or 2
new Client({ url: "ws://127.0.0.1:8000/realtime", protocol: 3 });
