// A small typed event emitter (no dependency on Node's EventEmitter or the DOM's EventTarget).
export class Emitter {
    #listeners = new Map();
    /** Call `listener` on every `name` event; returns a function that removes it. */
    on(name, listener) {
        let set = this.#listeners.get(name);
        if (set === undefined) {
            set = new Set();
            this.#listeners.set(name, set);
        }
        set.add(listener);
        return () => this.off(name, listener);
    }
    /** Remove `listener`. */
    off(name, listener) {
        this.#listeners.get(name)?.delete(listener);
    }
    /**
     * Call the listeners of `name` in order. A listener that throws does not stop the others or the
     * client: its error is rethrown from a microtask, where the platform reports it (as `EventTarget` does).
     */
    emit(name, ...args) {
        for (const listener of this.listeners(name)) {
            try {
                listener(...args);
            }
            catch (error) {
                queueMicrotask(() => {
                    throw error;
                });
            }
        }
    }
    /** The listeners of `name`, as a copy. */
    listeners(name) {
        const set = this.#listeners.get(name);
        return set === undefined ? [] : [...set];
    }
}
