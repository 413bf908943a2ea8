// Types for the switchboard browser client (static/client.js, /client.mjs). Served at
// GET /client.d.ts.

/** An event as delivered (SPEC section 4): `id` is `<unix-ms>-<seq>`. */
export interface SwitchboardEvent<T = unknown> {
  type: 'event';
  topic: string;
  event: string;
  id: string;
  data: T;
  /** Present on events a browser published: who sent it. */
  user?: string;
  conn_id?: string;
}

export interface Welcome {
  type: 'welcome';
  conn_id: string;
  user: string;
  org: string;
  heartbeat_ms: number;
}

export type Transport = 'websocket' | 'sse';

export interface StatusDetails {
  connecting: { url: string; attempt: number; transport: Transport };
  /** `fallback` is set (a sentence for people) when receiving over SSE because WebSockets are blocked. */
  open: Welcome & { transport: Transport; fallback?: string };
  closed: { code: number; reason: string; willRetry: boolean };
  /** 4401 unauthenticated or 4403 origin not allowed: not retried until connect() is called. */
  refused: { code: 4401 | 4403; reason: string };
  'reconnect-scheduled': { delay: number; attempt: number; code: number; reason: string };
  resync: { topic: string };
  error: { code: string; message: string };
}

export type Status = keyof StatusDetails;

/** `(status, detail)` pairs: checking `status` narrows `detail`. */
export type StatusArgs = { [S in Status]: [status: S, detail: StatusDetails[S]] }[Status];

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  setInterval(fn: () => void, ms: number): unknown;
  clearInterval(handle: unknown): void;
}

export interface SwitchboardOptions {
  /** WebSocket URL; default `ws(s)://<page host>/ws`. */
  url?: string;
  /** SSE fallback URL; default derived from `url` (`http(s)://<host>/sse`). */
  sseUrl?: string;
  onEvent?(event: SwitchboardEvent): void;
  onStatus?(...args: StatusArgs): void;
  onWelcome?(info: Welcome): void;
  onBinary?(data: ArrayBuffer): void;
  onFrame?(direction: 'in' | 'out', frame: { type: string; [key: string]: unknown }): void;
  /** Injected environment, for tests and unusual hosts. */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
  random?(): number;
  clock?: Partial<Clock>;
}

export declare class Switchboard {
  constructor(options?: SwitchboardOptions);
  readonly url: string;
  readonly sseUrl: string;
  readonly status: Exclude<Status, 'resync' | 'error'>;
  readonly transport: Transport;
  /** The last welcome, or null while not open. */
  readonly info: Welcome | null;
  /** Open a connection (also after a refusal, e.g. once signed in). */
  connect(): this;
  /** Close the current connection and connect again at once. */
  reconnect(): this;
  /** Stop for good: no reconnect until connect(). */
  close(): this;
  /** Join a topic; after a reconnect it resumes from the last event seen (`since`). */
  subscribe(topic: string, options?: { binary?: boolean }): this;
  unsubscribe(topic: string): this;
  /** False when not open over a WebSocket (SSE is receive only); nothing is queued. */
  publish(topic: string, data: unknown, eventName?: string): boolean;
  stream(topic: string): boolean;
  sendBinary(data: ArrayBuffer | ArrayBufferView | Blob): boolean;
  /** -1, 0, 1 comparing two event ids; null when either is not `<ms>-<seq>`. */
  static compareIds(a: string, b: string): -1 | 0 | 1 | null;
}

export default Switchboard;

declare global {
  interface Window {
    /** Set by the classic `<script src="/client.js">`. */
    Switchboard: typeof Switchboard;
  }
}
