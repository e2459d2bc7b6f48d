// A small typed event emitter (no dependency on Node's EventEmitter or the DOM's EventTarget).

/** Stop listening. */
export type Unsubscribe = () => void;

export class Emitter<Events extends { [name: string]: unknown[] }> {
  readonly #listeners = new Map<keyof Events, Set<(...args: never[]) => unknown>>();

  /** Call `listener` on every `name` event; returns a function that removes it. */
  on<K extends keyof Events>(name: K, listener: (...args: Events[K]) => unknown): Unsubscribe {
    let set = this.#listeners.get(name);
    if (set === undefined) {
      set = new Set();
      this.#listeners.set(name, set);
    }
    set.add(listener as (...args: never[]) => unknown);
    return () => this.off(name, listener);
  }

  /** Remove `listener`. */
  off<K extends keyof Events>(name: K, listener: (...args: Events[K]) => unknown): void {
    this.#listeners.get(name)?.delete(listener as (...args: never[]) => unknown);
  }

  /**
   * Call the listeners of `name` in order. A listener that throws does not stop the others or the
   * client: its error is rethrown from a microtask, where the platform reports it (as `EventTarget` does).
   */
  protected emit<K extends keyof Events>(name: K, ...args: Events[K]): void {
    for (const listener of this.listeners(name)) {
      try {
        listener(...args);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  /** The listeners of `name`, as a copy. */
  protected listeners<K extends keyof Events>(name: K): Array<(...args: Events[K]) => unknown> {
    const set = this.#listeners.get(name);
    return set === undefined ? [] : ([...set] as Array<(...args: Events[K]) => unknown>);
  }
}
