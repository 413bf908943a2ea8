// Unit tests of static/client.js under Node's test runner (`node --test tests/client/`, run
// by tests/client_js.rs): a fake WebSocket, a fake fetch for /sse and a fake clock, so every
// delay is asserted exactly and nothing sleeps.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import vm from 'node:vm';
import { createRequire } from 'node:module';
import { Switchboard } from '../../static/client.mjs';
import { FakeClock, fakeWebSocket, fakeFetch, settle, sseRecord } from './fakes.mjs';

const WS_URL = 'ws://hub.test/ws';

function setup({ random = () => 0.5, withFetch = true } = {}) {
  const clock = new FakeClock();
  const { WebSocket, sockets } = fakeWebSocket();
  const { fetch, requests } = fakeFetch();
  const statuses = [];
  const events = [];
  const sb = new Switchboard({
    url: WS_URL, WebSocket, fetch: withFetch ? fetch : undefined, random, clock,
    onStatus: (s, d) => statuses.push([s, d]),
    onEvent: (e) => events.push(e),
  });
  if (!withFetch) sb.fetch = null;
  const last = (name) => statuses.filter(([s]) => s === name).map(([, d]) => d).at(-1);
  return { sb, clock, sockets, requests, statuses, events, last };
}

const event = (id, topic = 'calls') => ({ type: 'event', topic, event: 'call.status', id, data: { id } });

test('loads as an ES module, as a plain <script>, and through require', async () => {
  assert.equal(typeof Switchboard, 'function');
  const mod = await import('../../static/client.mjs');
  assert.equal(mod.default, Switchboard);
  // A classic script in a page: no module, no exports; it sets window.Switchboard.
  const window = {};
  window.window = window;
  const source = readFileSync(new URL('../../static/client.js', import.meta.url), 'utf8');
  vm.runInNewContext(source, window);
  assert.equal(typeof window.Switchboard, 'function');
  assert.equal(typeof window.Switchboard.compareIds, 'function');
  // CommonJS (bundlers, Node): module.exports.
  const required = createRequire(import.meta.url)('../../static/client.js');
  assert.equal(typeof required, 'function');
  assert.equal(required.compareIds('1-2', '1-10'), -1);
});

test('resumes each topic with `since` after a reconnect and drops replayed duplicates', () => {
  const { sb, clock, sockets, events } = setup();
  sb.subscribe('calls').subscribe('call:abc').connect();
  sockets[0].welcome();
  assert.deepEqual(sockets[0].sent, [{ type: 'subscribe', topic: 'calls' }, { type: 'subscribe', topic: 'call:abc' }]);
  sockets[0].receive(event('100-1'));
  sockets[0].receive(event('100-2'));
  sockets[0].receive(event('90-0', 'call:abc'));
  sockets[0].serverClose(1006);
  clock.advance(Math.max(...clock.pending()));
  assert.equal(sockets.length, 2);
  sockets[1].welcome();
  assert.deepEqual(sockets[1].sent, [
    { type: 'subscribe', topic: 'calls', since: '100-2' },
    { type: 'subscribe', topic: 'call:abc', since: '90-0' },
  ]);
  sockets[1].receive(event('100-2')); // replayed again by the server: not delivered twice
  sockets[1].receive(event('100-3'));
  assert.deepEqual(events.map((e) => e.id), ['100-1', '100-2', '90-0', '100-3']);
});

test('reconnect delays are full-jitter exponential backoff, capped at 30 s', () => {
  // random() = 1 draws the ceiling of each attempt's window; 0 draws the 100 ms floor.
  for (const [random, want] of [
    [() => 0.999999, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]],
    [() => 0, [100, 100, 100, 100, 100, 100, 100, 100]],
    [() => 0.5, [250, 500, 1000, 2000, 4000, 8000, 15000, 15000]],
  ]) {
    const { sb, clock, sockets, last } = setup({ random });
    sb.connect();
    const delays = [];
    for (let i = 0; i < want.length; i++) {
      sockets.at(-1).welcome(); // each connection opens, then drops (so no SSE fallback)
      sockets.at(-1).serverClose(1011, 'internal error');
      delays.push(last('reconnect-scheduled').delay);
      assert.deepEqual(clock.pending(), [delays.at(-1)]);
      clock.advance(delays.at(-1));
    }
    assert.deepEqual(delays, want);
  }
});

test('a connection that stayed up starts the backoff afresh', () => {
  const { sb, clock, sockets, last } = setup({ random: () => 0.999999 });
  sb.connect();
  for (let i = 0; i < 3; i++) { sockets.at(-1).welcome(); sockets.at(-1).serverClose(1006); clock.advance(last('reconnect-scheduled').delay); }
  assert.equal(last('reconnect-scheduled').delay, 2000);
  sockets.at(-1).welcome();
  clock.advance(60_000);
  sockets.at(-1).serverClose(1006);
  assert.equal(last('reconnect-scheduled').delay, 500);
});

for (const [code, reason] of [[4401, 'unauthenticated: session expired'], [4403, 'origin not allowed: http://127.0.0.1:3000']]) {
  test(`${code} is refused for good: no retry until connect() is called again`, () => {
    const { sb, clock, sockets, last, statuses } = setup();
    sb.subscribe('calls').connect();
    sockets[0].open();
    sockets[0].serverClose(code, reason);
    assert.deepEqual(last('refused'), { code, reason });
    assert.deepEqual(clock.pending(), []);
    clock.advance(3_600_000);
    assert.equal(sockets.length, 1);
    assert.ok(!statuses.some(([s]) => s === 'reconnect-scheduled'));
    sb.connect(); // e.g. after signing in
    assert.equal(sockets.length, 2);
  });
}

test('4429 and 1013 back off longer than an ordinary drop', () => {
  for (const code of [4429, 1013]) {
    for (const [random, first, second] of [[() => 0, 5000, 5000], [() => 0.999999, 5000, 10000]]) {
      const { sb, clock, sockets, last } = setup({ random });
      sb.connect();
      sockets[0].open();
      sockets[0].serverClose(code, 'too many');
      assert.equal(last('reconnect-scheduled').delay, first, `code ${code} first`);
      assert.equal(last('reconnect-scheduled').code, code);
      clock.advance(first - 1);
      assert.equal(sockets.length, 1, 'not before the delay');
      clock.advance(1);
      assert.equal(sockets.length, 2);
      sockets[1].open();
      sockets[1].serverClose(code, 'too many');
      assert.equal(last('reconnect-scheduled').delay, second, `code ${code} second`);
    }
    // An ordinary close with the same random draw comes back much sooner.
    const plain = setup({ random: () => 0.999999 });
    plain.sb.connect();
    plain.sockets[0].open();
    plain.sockets[0].serverClose(1011);
    assert.ok(plain.last('reconnect-scheduled').delay < 5000);
  }
  // Capped at two minutes.
  const { sb, clock, sockets, last } = setup({ random: () => 0.999999 });
  sb.connect();
  for (let i = 0; i < 10; i++) { sockets.at(-1).open(); sockets.at(-1).serverClose(4429); clock.advance(last('reconnect-scheduled').delay); }
  assert.equal(last('reconnect-scheduled').delay, 120000);
});

test('honours reconnect{after_ms} exactly, whatever the 1012 close that follows', () => {
  const { sb, clock, sockets, last } = setup({ random: () => 0 });
  sb.subscribe('calls').connect();
  sockets[0].welcome();
  sockets[0].receive(event('5-1'));
  sockets[0].receive({ type: 'reconnect', after_ms: 3000 });
  assert.equal(last('reconnect-scheduled').delay, 3000);
  clock.advance(1000);
  sockets[0].serverClose(1012, 'server restarting');
  assert.equal(last('reconnect-scheduled').delay, 2000, 'what is left of the server-chosen delay');
  clock.advance(1999);
  assert.equal(sockets.length, 1);
  clock.advance(1);
  assert.equal(sockets.length, 2);
  sockets[1].welcome();
  assert.deepEqual(sockets[1].sent, [{ type: 'subscribe', topic: 'calls', since: '5-1' }]);
});

// Three sockets that fail before `open` (what a page sees of a proxy that strips Upgrade
// and the hub's 426), with the delays between them run out.
function blockWebSockets({ sockets, clock }, n = 3) {
  for (let i = 0; i < n; i++) {
    sockets.at(-1).fail();
    if (i < n - 1) clock.advance(Math.max(...clock.pending()));
  }
}

test('falls back to SSE when WebSockets are blocked, says so, and resumes with Last-Event-ID', async () => {
  const t = setup();
  const { sb, clock, sockets, requests, events, last } = t;
  sb.subscribe('calls').subscribe('call:abc').connect();
  sockets[0].welcome();
  sockets[0].receive(event('100-1'));
  sockets[0].serverClose(1006);
  clock.advance(Math.max(...clock.pending()));
  blockWebSockets(t);
  assert.equal(sockets.length, 4);
  assert.equal(requests.length, 1, 'an SSE request after the third failure');
  assert.equal(sb.transport, 'sse');
  assert.equal(requests[0].url, 'http://hub.test/sse?topic=calls&topic=call%3Aabc');
  assert.equal(requests[0].headers['Last-Event-ID'], 'calls=100-1');
  requests[0].accept();
  requests[0].write(sseRecord({ retry: 2000, event: 'welcome', data: { type: 'welcome', conn_id: 's1', user: 'u1', org: '42', heartbeat_ms: 10000 } }));
  await settle();
  const open = last('open');
  assert.equal(open.transport, 'sse');
  assert.match(open.fallback, /WebSockets are blocked/);
  // A record may arrive split across chunks.
  const rec = sseRecord({ id: 'calls=100-2,call:abc=7-1', event: 'call.status', data: event('100-2') });
  requests[0].write(rec.slice(0, 10));
  requests[0].write(rec.slice(10) + sseRecord({ id: 'calls=100-2,call:abc=7-1', event: 'call.status', data: event('7-1', 'call:abc') }));
  await settle();
  assert.deepEqual(events.map((e) => e.id), ['100-1', '100-2', '7-1']);
  assert.equal(sb.publish('voice:1:in', {}), false, 'SSE is receive only');

  // The stream drops: it comes back over SSE with every topic's position.
  requests[0].end();
  await settle();
  assert.equal(last('closed').willRetry, true);
  clock.advance(last('reconnect-scheduled').delay);
  assert.equal(requests.length, 2);
  assert.equal(requests[1].headers['Last-Event-ID'], 'calls=100-2,call:abc=7-1');
});

test('on SSE it tries WebSockets again later, and switches back once one is welcomed', async () => {
  const t = setup();
  const { sb, clock, sockets, requests, events, last } = t;
  sb.subscribe('calls').connect();
  blockWebSockets(t);
  requests[0].accept();
  requests[0].write(sseRecord({ event: 'welcome', data: { type: 'welcome', conn_id: 's1', user: 'u1', org: '42', heartbeat_ms: 1 } }));
  requests[0].write(sseRecord({ id: 'calls=9-1', event: 'call.status', data: event('9-1') }));
  await settle();
  assert.equal(sockets.length, 4, 'one WebSocket try as soon as SSE is up (the failures may have been a restart)');
  sockets[3].fail(); // really blocked: SSE stays, and the next try waits a minute
  assert.equal(sb.transport, 'sse');
  clock.advance(59_999);
  assert.equal(sockets.length, 4);
  clock.advance(1);
  assert.equal(sockets.length, 5, 'a WebSocket probe after a minute');
  sockets[4].fail(); // still blocked: the next probe waits longer
  await settle();
  assert.equal(sb.transport, 'sse');
  assert.equal(requests[0].aborted, false);
  clock.advance(119_999);
  assert.equal(sockets.length, 5);
  clock.advance(1);
  assert.equal(sockets.length, 6);
  sockets[5].welcome();
  assert.equal(sb.transport, 'websocket');
  assert.equal(requests[0].aborted, true, 'the SSE stream is closed once the socket works');
  assert.equal(last('open').transport, 'websocket');
  assert.deepEqual(sockets[5].sent, [{ type: 'subscribe', topic: 'calls', since: '9-1' }]);
  sockets[5].receive(event('9-2'));
  assert.deepEqual(events.map((e) => e.id), ['9-1', '9-2']);
});

test('after a hub restart mistaken for a blocked network, it is back on the WebSocket at once', async () => {
  const t = setup();
  const { sb, sockets, requests, last } = t;
  sb.subscribe('calls').connect();
  blockWebSockets(t); // the hub was down for three attempts
  requests[0].accept();
  requests[0].write(sseRecord({ event: 'welcome', data: { type: 'welcome', conn_id: 's1', user: 'u1', org: '42', heartbeat_ms: 1 } }));
  await settle();
  assert.equal(last('open').transport, 'sse');
  sockets[3].welcome(); // the immediate try works: the network never blocked WebSockets
  assert.equal(sb.transport, 'websocket');
  assert.equal(requests[0].aborted, true);
  assert.equal(sb.publish('voice:1:in', {}), true);
});

test('an SSE refusal (HTTP 403/401) is final, with the hub\'s reason', async () => {
  for (const [status, code, detail] of [[403, 4403, 'origin not allowed: http://127.0.0.1:3000'], [401, 4401, 'unauthenticated: no session cookie']]) {
    const t = setup();
    t.sb.subscribe('calls').connect();
    blockWebSockets(t);
    t.requests[0].refuse(status, { error: 'x', detail });
    await settle();
    assert.deepEqual(t.last('refused'), { code, reason: detail });
    assert.deepEqual(t.clock.pending(), []);
  }
});

test('an SSE close record and a 429 are handled like the WebSocket close codes', async () => {
  const t = setup({ random: () => 0 });
  t.sb.subscribe('calls').connect();
  blockWebSockets(t);
  t.requests[0].refuse(429, { error: 'connection_limit', detail: 'too many connections (limit 5)' });
  await settle();
  assert.equal(t.last('reconnect-scheduled').code, 4429);
  assert.equal(t.last('reconnect-scheduled').delay, 5000);
  t.clock.advance(5000);
  t.requests[1].accept();
  t.requests[1].write(sseRecord({ event: 'close', data: { type: 'close', code: 4401, reason: 'unauthenticated: logged out' } }));
  await settle();
  assert.deepEqual(t.last('refused'), { code: 4401, reason: 'unauthenticated: logged out' });
});

test('without fetch it keeps retrying the WebSocket with backoff', () => {
  const t = setup({ withFetch: false, random: () => 0.999999 });
  t.sb.connect();
  blockWebSockets(t, 5);
  assert.equal(t.sb.transport, 'websocket');
  assert.equal(t.last('reconnect-scheduled').delay, 8000);
});
