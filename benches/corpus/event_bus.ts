// Copyright 2026 the stral authors. Licensed under the Apache License, Version 2.0.
// A typed publish/subscribe event bus with once-listeners and async dispatch.

export type Listener<T> = (payload: T) => void | Promise<void>;

interface Subscription<T> {
  listener: Listener<T>;
  once: boolean;
}

export class EventBus<Events extends Record<string, unknown>> {
  private listeners = new Map<keyof Events, Subscription<any>[]>();

  on<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    return this.add(event, listener, false);
  }

  once<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    return this.add(event, listener, true);
  }

  off<K extends keyof Events>(event: K, listener: Listener<Events[K]>): void {
    const subs = this.listeners.get(event);
    if (!subs) return;
    const kept = subs.filter((s) => s.listener !== listener);
    if (kept.length === 0) {
      this.listeners.delete(event);
    } else {
      this.listeners.set(event, kept);
    }
  }

  async emit<K extends keyof Events>(event: K, payload: Events[K]): Promise<number> {
    const subs = this.listeners.get(event) ?? [];
    const remaining = subs.filter((s) => !s.once);
    if (remaining.length === 0) {
      this.listeners.delete(event);
    } else {
      this.listeners.set(event, remaining);
    }
    const errors: unknown[] = [];
    await Promise.all(
      subs.map(async (s) => {
        try {
          await s.listener(payload);
        } catch (err) {
          errors.push(err);
        }
      }),
    );
    if (errors.length > 0) {
      throw new AggregateError(errors, `${String(event)}: ${errors.length} listener(s) failed`);
    }
    return subs.length;
  }

  listenerCount<K extends keyof Events>(event: K): number {
    return this.listeners.get(event)?.length ?? 0;
  }

  private add<K extends keyof Events>(
    event: K,
    listener: Listener<Events[K]>,
    once: boolean,
  ): () => void {
    const subs = this.listeners.get(event) ?? [];
    subs.push({ listener, once });
    this.listeners.set(event, subs);
    return () => this.off(event, listener);
  }
}

interface EditorEvents {
  keystroke: { file: string; offset: number; char: string };
  completion: { file: string; text: string; latencyMs: number };
  [key: string]: unknown;
}

export function wireEditor(bus: EventBus<EditorEvents>): void {
  let pending = 0;
  bus.on("keystroke", ({ file, offset }) => {
    pending += 1;
    console.debug(`typed in ${file} at ${offset}; ${pending} pending`);
  });
  bus.on("completion", ({ text, latencyMs }) => {
    pending = Math.max(0, pending - 1);
    console.info(`completion of ${text.length} chars in ${latencyMs.toFixed(1)} ms`);
  });
}
