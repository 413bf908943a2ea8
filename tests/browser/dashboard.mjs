// Real-browser end-to-end test of the switchboard dashboard (GET /), driven by playwright-core
// against Debian's chromium. Run by tests/dashboard.rs, which starts the hub first:
//
//   node tests/browser/dashboard.mjs <hub base url> <scenario> [out dir]
//
// scenarios:
//   login   the hub has dev login on and the demo simulator running, and admits the page's own
//           origin: the first socket is refused 4401 and the login form shows; after signing in
//           the status is `open`, simulated calls appear, and a call published through
//           POST /api/publish moves through queued -> ringing -> in-progress -> ended on screen;
//           Sign out closes the socket (4401 logged out) and brings the login form back.
//   origin  the hub does not admit the page's own origin: the page says
//           `origin not allowed: <origin>` (the 4403 close reason), not a bare 1006.
//   sse     <base> is a proxy in front of the hub that strips the WebSocket upgrade: every socket
//           fails before `open`, the page falls back to GET /sse, signs in with the dev login,
//           says it is connected over the fallback, and shows a call published through
//           POST /api/publish.
//   restart-drain, restart-kill
//           <base> is nginx in front of two pods sharing Redis (SB_PODS: their own URLs). Signed
//           in and live, the script asks the test (`ACTION stop <pod>`, answered `DONE` on stdin)
//           to stop the pod that holds the page's socket: SIGTERM (it drains: reconnect{after_ms},
//           1012, exit) or SIGKILL (the socket drops). The page must say `reconnecting`; calls
//           published while the page is away, and after the pod is started again
//           (`ACTION start <pod>`), must all reach it once it reconnects: it resumes with
//           `since`, is told `recovered: true`, and receives every event id once, in order.
//           So that "published while the page is away" holds by construction, the page's clock
//           (Playwright's fake timers) is paused from just before the stop until the gap events
//           are published: the page notices the close, but its reconnect timer cannot fire.
//
// Prints one line per step; on failure prints what went wrong (with the page's state, its
// console and its raw frame log), takes a screenshot, and exits 1. Screenshots go to the out
// dir (default: a fresh temporary directory), whose path is printed.
//
// Every wait is on a condition in the page (Playwright's waitForFunction / locators), bounded by
// a timeout; nothing sleeps for a fixed time.

import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const PUBLISH_KEY = process.env.SB_PUBLISH_KEY || 'test-publish-key';
const ORG = 'demo';
const USER = 'agent-1';
const STEP_MS = 5000;       // bound on each wait for something the page should show promptly
const SIMULATOR_MS = 20000; // bound on the wait for the demo simulator's first call on screen
const OVERALL_MS = 60000;   // the whole script, browser start included
const FALLBACK_MS = 15000;  // bound on the page giving up on WebSockets (a few failed tries with backoff)

const [base, scenario, outArg] = process.argv.slice(2);
const SCENARIOS = ['login', 'origin', 'sse', 'restart-drain', 'restart-kill'];
if (!base || !SCENARIOS.includes(scenario)) {
  console.error(`usage: node dashboard.mjs <hub base url, e.g. http://127.0.0.1:8080> <${SCENARIOS.join('|')}> [out dir]`);
  process.exit(2);
}
const hub = new URL(base);
const outDir = outArg || mkdtempSync(join(tmpdir(), 'sb-dashboard-'));
mkdirSync(outDir, { recursive: true });
const profileDir = mkdtempSync(join(tmpdir(), 'sb-chromium-profile-'));

const started = Date.now();
function step(msg) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s] ${msg}`);
}

class TestFailure extends Error {}
function fail(msg) { throw new TestFailure(msg); }

let context = null;
let page = null;
const consoleLines = [];
const pageErrors = [];

// A short description of what the page shows, for failure messages.
async function pageState() {
  if (!page) return '(no page)';
  try {
    return await page.evaluate(() => {
      const t = (id) => { const e = document.getElementById(id); return e ? JSON.stringify(e.textContent) : '(missing)'; };
      const rows = Array.from(document.querySelectorAll('#calls tr[data-call-id]')).slice(0, 12)
        .map((r) => `${r.getAttribute('data-call-id')}=${(r.querySelector('td.status') || {}).textContent}`);
      const log = Array.from(document.querySelectorAll('#log li')).slice(0, 10).map((li) => '    ' + li.textContent);
      return [
        `  url ${location.href}`,
        `  #status ${t('status')} #status-code ${t('status-code')} #status-detail ${t('status-detail')} #status-retry ${t('status-retry')}`,
        `  #login hidden=${document.getElementById('login').hidden} #login-msg ${t('login-msg')}`,
        `  #who hidden=${document.getElementById('who').hidden} user ${t('who-user')} org ${t('who-org')}`,
        `  #notice hidden=${document.getElementById('notice').hidden} ${t('notice-text')}`,
        `  rows (${document.querySelectorAll('#calls tr[data-call-id]').length}): ${rows.join(' ') || '(none)'}`,
        '  raw frame log (newest first):', ...log,
      ].join('\n');
    });
  } catch (e) {
    return `(page state unavailable: ${e.message})`;
  }
}

// Wait until the text of `selector` satisfies `want` (a string: equal after trimming; a RegExp:
// matches). Fails with what the element showed last.
async function waitText(selector, want, what, timeout = STEP_MS) {
  const spec = want instanceof RegExp ? { re: want.source, flags: want.flags } : { eq: want };
  try {
    await page.waitForFunction(({ selector, spec }) => {
      const el = document.querySelector(selector);
      if (!el) return false;
      const text = el.textContent.trim();
      return spec.re !== undefined ? new RegExp(spec.re, spec.flags).test(text) : text === spec.eq;
    }, { selector, spec }, { timeout, polling: 'raf' });
  } catch (e) {
    if (!/Timeout/i.test(e.message)) throw e;
    const got = await page.evaluate((s) => {
      const el = document.querySelector(s);
      return el ? JSON.stringify(el.textContent.trim()) : '(no such element)';
    }, selector).catch(() => '(unknown)');
    fail(`${what}: expected ${selector} to show ${want instanceof RegExp ? want : JSON.stringify(want)} ` +
      `within ${timeout} ms, it shows ${got}`);
  }
  const text = (await page.locator(selector).first().textContent()).trim();
  const shown = JSON.stringify(text);
  step(`${what}: ${selector} = ${shown.length > 100 ? shown.slice(0, 97) + '...' : shown}`);
  return text;
}

async function waitVisible(selector, what, visible = true, timeout = STEP_MS) {
  try {
    await page.locator(selector).first().waitFor({ state: visible ? 'visible' : 'hidden', timeout });
  } catch (e) {
    if (!/Timeout/i.test(e.message)) throw e;
    fail(`${what}: ${selector} did not become ${visible ? 'visible' : 'hidden'} within ${timeout} ms`);
  }
  step(`${what}: ${selector} ${visible ? 'visible' : 'hidden'}`);
}

async function publish(data) {
  const res = await fetch(new URL('/api/publish', hub), {
    method: 'POST',
    headers: { 'Authorization': `Bearer ${PUBLISH_KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ org: ORG, topic: 'calls', event: 'call.status', data }),
  });
  const body = await res.text();
  if (res.status !== 202) fail(`POST /api/publish ${data.call_id} ${data.status}: HTTP ${res.status} ${body}`);
  return JSON.parse(body).id;
}

async function screenshot(name) {
  const path = join(outDir, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  step(`screenshot ${path}`);
  return path;
}

// The status region is a polite live region that says, in words, what `#status-help` says.
async function checkAnnounced(want, what) {
  const live = await page.evaluate(() => {
    const el = document.getElementById('announce');
    return el && { live: el.getAttribute('aria-live'), role: el.getAttribute('role'), text: el.textContent };
  });
  if (!live) fail(`${what}: no #announce live region`);
  if (live.live !== 'polite' || live.role !== 'status') {
    fail(`${what}: #announce has aria-live=${live.live} role=${live.role}, want polite / status`);
  }
  if (!live.text.includes(want)) fail(`${what}: the live region announced ${JSON.stringify(live.text)}, want ${JSON.stringify(want)}`);
  step(`${what}: announced ${JSON.stringify(live.text)}`);
}

// ---- scenario login ----------------------------------------------------------------------------
async function scenarioLogin() {
  await page.goto(new URL('/', hub).href, { waitUntil: 'domcontentloaded' });
  step(`opened ${page.url()}`);

  // No session yet: the socket is refused with 4401 and the dev login form shows.
  await waitText('#status', 'refused', 'no session');
  await waitText('#status-code', '4401', 'no session');
  await waitText('#status-detail', /^unauthenticated: /, 'no session');
  await waitVisible('#login', 'no session');
  await waitVisible('#who', 'no session', false);
  await waitVisible('#retry', 'no session: sign in, not retry', false);
  const notSignedIn = 'You are not signed in: sign in to see live calls.';
  await waitText('#status-help', notSignedIn, 'no session');
  await checkAnnounced(notSignedIn, 'no session');
  // The fix is to sign in, so the keyboard is taken there, to a labelled field.
  const focused = await page.evaluate(() => {
    const el = document.activeElement;
    return el && { id: el.id, label: el.labels && el.labels[0] ? el.labels[0].textContent.trim() : '' };
  });
  if (!focused || focused.id !== 'login-user' || !focused.label.startsWith('User')) {
    fail(`no session: focus is on ${JSON.stringify(focused)}, want the labelled #login-user field`);
  }
  await screenshot('dashboard-refused');

  // Sign in with the dev login.
  await page.fill('#login-user', USER);
  await page.fill('#login-org', ORG);
  await page.click('#login-submit');
  step(`signed in as ${USER} / org ${ORG}`);
  await waitText('#status', 'open', 'after login');
  await waitText('#status-detail', '', 'after login');
  await waitVisible('#login', 'after login', false);
  await waitText('#status-help', 'Live calls update as they happen.', 'after login');
  await checkAnnounced('Connected', 'after login');
  await waitText('#who-user', USER, 'after login');
  await waitText('#who-org', ORG, 'after login');
  // Until the server confirms the subscription, a published event would not reach the page.
  await waitText('#log', /\{"type":"subscribed","topic":"calls"\}/, 'subscription confirmed');

  // A call of our own, published as a backend service would, moving through its life.
  const callId = `e2e-${process.pid}-${Date.now()}`;
  const row = `#calls tr[data-call-id="${callId}"]`;
  const startedAt = new Date(Date.now() - 3000).toISOString();
  const call = {
    call_id: callId, direction: 'inbound', from: '+15550100', to: '+15550199',
    agent_id: null, started_at: startedAt, ended_at: null, ended_reason: null,
  };
  const lifecycle = [
    { status: 'queued' },
    { status: 'ringing', agent_id: USER },
    { status: 'in-progress', agent_id: USER },
    { status: 'ended', agent_id: USER, ended_at: new Date().toISOString(), ended_reason: 'customer-ended-call' },
  ];
  for (const change of lifecycle) {
    Object.assign(call, change);
    const id = await publish({ ...call });
    step(`published ${callId} ${call.status} (event ${id})`);
    await waitText(`${row} td.status`, call.status, `call ${call.status}`);
  }
  await waitText(`${row} td.direction`, /inbound/, 'ended call');
  await waitText(`${row} td.from`, call.from, 'ended call');
  await waitText(`${row} td.agent`, USER, 'ended call');
  await waitText(`${row} td.reason`, 'customer-ended-call', 'ended call');
  const cls = await page.getAttribute(row, 'class');
  if (!/\bended\b/.test(cls || '')) fail(`ended call: row class is ${JSON.stringify(cls)}, expected it to include "ended"`);
  const rowsWithId = await page.locator(row).count();
  if (rowsWithId !== 1) fail(`call ${callId}: ${rowsWithId} rows on the board, expected exactly 1`);

  // The hub's own demo simulator feeds the same board.
  try {
    await page.waitForFunction((ours) => Array.from(document.querySelectorAll('#calls tr[data-call-id]'))
      .some((r) => r.getAttribute('data-call-id') !== ours), callId, { timeout: SIMULATOR_MS, polling: 'raf' });
  } catch (e) {
    if (!/Timeout/i.test(e.message)) throw e;
    fail(`demo simulator: no simulated call on the board within ${SIMULATOR_MS} ms ` +
      '(is the hub running with SWITCHBOARD__DEMO__SIMULATE_CALLS=true?)');
  }
  const simulated = await page.$$eval('#calls tr[data-call-id]', (rows, ours) => rows
    .filter((r) => r.getAttribute('data-call-id') !== ours)
    .map((r) => `${r.getAttribute('data-call-id')}=${r.querySelector('td.status').textContent}`), callId);
  step(`demo simulator: ${simulated.length} simulated call(s) on the board: ${simulated.join(' ')}`);
  await waitVisible('#empty', 'calls on the board', false);
  await waitText('#status', 'open', 'still connected');

  await screenshot('dashboard-login');

  // Its TypeScript declarations are served beside it.
  const dts = await fetch(new URL('/client.d.ts', hub));
  const dtsText = await dts.text();
  if (dts.status !== 200 || !dtsText.includes('export declare class Switchboard')) {
    fail(`GET /client.d.ts: HTTP ${dts.status}, ${JSON.stringify(dtsText.slice(0, 120))}`);
  }

  // The client as an ES module, on a network that blocks WebSockets: a second client whose
  // socket URL always fails before `open` falls back to GET /sse of this hub, says so, and
  // receives a published event there.
  await page.evaluate(() => {
    window.__fallback = { statuses: [], events: [] };
    return import('/client.mjs').then((mod) => {
      const sb = new mod.Switchboard({
        url: (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws-blocked-by-proxy',
        onStatus: (s, d) => window.__fallback.statuses.push([s, d]),
        onEvent: (e) => window.__fallback.events.push(e),
      });
      window.__fallback.sb = sb;
      sb.subscribe('calls').connect();
    });
  });
  try {
    await page.waitForFunction(() => window.__fallback.statuses.some(([s, d]) => s === 'open' && d.transport === 'sse'),
      null, { timeout: 10000 });
  } catch (e) {
    const seen = await page.evaluate(() => JSON.stringify(window.__fallback.statuses));
    fail(`SSE fallback: the ES module client never opened over SSE; statuses ${seen}`);
  }
  step('SSE fallback: the ES module client opened over /sse after the blocked WebSocket failed');
  const fallbackCall = `${callId}-sse`;
  const fallbackId = await publish({ ...call, call_id: fallbackCall, status: 'queued' });
  try {
    await page.waitForFunction((id) => window.__fallback.events.some((e) => e.id === id && e.data.call_id),
      fallbackId, { timeout: STEP_MS });
  } catch (e) {
    const seen = await page.evaluate(() => JSON.stringify(window.__fallback.events.slice(-5)));
    fail(`SSE fallback: event ${fallbackId} did not arrive over SSE; last events ${seen}`);
  }
  step(`SSE fallback: event ${fallbackId} arrived over SSE`);
  await page.evaluate(() => window.__fallback.sb.close());

  // Sign out: the hub closes this session's socket with 4401 and the page offers the login again.
  await page.click('#logout');
  step('clicked Sign out');
  await waitText('#status', 'refused', 'after sign-out');
  await waitText('#status-code', '4401', 'after sign-out');
  await waitText('#status-detail', 'unauthenticated: logged out', 'after sign-out');
  await waitText('#status-help', 'You signed out: sign in again to see live calls.', 'after sign-out');
  await checkAnnounced('You signed out', 'after sign-out');
  await waitVisible('#login', 'after sign-out');
  await waitVisible('#retry', 'after sign-out: sign in, not retry', false);
  await waitVisible('#who', 'after sign-out', false);
}

// ---- scenario origin ---------------------------------------------------------------------------
async function scenarioOrigin() {
  const origin = hub.origin; // what the browser sends as Origin for the page's own socket
  await page.goto(new URL('/', hub).href, { waitUntil: 'domcontentloaded' });
  step(`opened ${page.url()}`);
  await waitText('#status', 'refused', 'origin refused');
  await waitText('#status-code', '4403', 'origin refused');
  await waitText('#status-detail', `origin not allowed: ${origin}`, 'origin refused');
  // Not a login problem: no login form, no retry countdown (a refusal is final).
  await waitVisible('#login', 'origin refused', false);
  await waitText('#status-retry', '', 'origin refused');
  // Final: nothing invites retrying (the fix is in the words below).
  await waitVisible('#retry', 'origin refused', false);
  // In plain words, with the fix that is the person's: the page is on 127.0.0.1, and the
  // usual trap is localhost versus 127.0.0.1; the hub's allowlist itself is never shown.
  const alt = `${hub.protocol}//localhost:${hub.port}`;
  const words = `This page's origin ${origin} is not allowed by the hub: open it as ${alt} or ask the operator to add it.`;
  await waitText('#status-help', words, 'origin refused');
  await checkAnnounced(words, 'origin refused');
  const secret = process.env.SB_ALLOWED_ORIGIN;
  if (secret) {
    const shown = await page.evaluate(() => document.documentElement.outerHTML + document.body.innerText);
    if (shown.includes(secret)) fail(`origin refused: the page reveals the hub's allowlist entry ${secret}`);
  }
  // Keyboard: Tab reaches the page's controls (the raw frame log's toggle), with a visible
  // focus ring, and never a Reconnect button.
  let focused = '';
  for (let i = 0; i < 15 && focused !== 'log-summary'; i++) {
    await page.keyboard.press('Tab');
    focused = await page.evaluate(() => {
      const el = document.activeElement;
      if (el && el.id === 'retry') return 'retry';
      return el && el.closest('#log-panel') && el.tagName === 'SUMMARY' ? 'log-summary' : (el && (el.id || el.tagName));
    });
    if (focused === 'retry') fail('origin refused: Tab reached a Reconnect button after a final refusal');
  }
  if (focused !== 'log-summary') fail(`origin refused: Tab never reached the raw frame log (last focus ${focused})`);
  const ring = await page.evaluate(() => {
    const cs = getComputedStyle(document.activeElement);
    return { style: cs.outlineStyle, width: cs.outlineWidth };
  });
  if (ring.style === 'none' || ring.width === '0px') fail(`origin refused: no visible focus ring (${JSON.stringify(ring)})`);
  step(`keyboard: Tab reaches the raw frame log, focus ring ${ring.style} ${ring.width}`);
  await screenshot('dashboard-origin');
}

// ---- scenario sse -------------------------------------------------------------------------------
async function scenarioSse() {
  await page.goto(new URL('/', hub).href, { waitUntil: 'domcontentloaded' });
  step(`opened ${page.url()}`);

  // The sockets fail before `open` (the proxy answers the hub's 426), the page turns to
  // GET /sse, which refuses it 401 (4401): no session yet, so the dev login shows.
  await waitText('#status', 'refused', 'no session, over the fallback', FALLBACK_MS);
  await waitText('#status-code', '4401', 'no session, over the fallback');
  await waitVisible('#login', 'no session, over the fallback');
  const wsFailed = (line) => line.includes("/ws' failed") && line.includes('Unexpected response code: 426');
  const failedBefore = consoleLines.filter(wsFailed).length;
  if (failedBefore === 0) fail('no session, over the fallback: no WebSocket failed with 426 through the proxy');
  step(`no session, over the fallback: ${failedBefore} WebSocket handshake(s) answered 426 through the proxy`);

  await page.fill('#login-user', USER);
  await page.fill('#login-org', ORG);
  await page.click('#login-submit');
  step(`signed in as ${USER} / org ${ORG}`);
  await waitText('#status', 'open (fallback)', 'after login', FALLBACK_MS);
  await waitVisible('#login', 'after login', false);
  await waitText('#help-title', 'Connected (fallback)', 'after login');
  await waitText('#status-help', 'This network blocks WebSockets, so live calls arrive over a slower fallback ' +
    'connection. Nothing to do: the board switches back by itself when it can.', 'after login');
  await checkAnnounced('Connected (fallback)', 'after login');
  await waitText('#who-user', USER, 'after login');

  const callId = `e2e-sse-${process.pid}-${Date.now()}`;
  const row = `#calls tr[data-call-id="${callId}"]`;
  const call = {
    call_id: callId, direction: 'inbound', from: '+15550100', to: '+15550199', agent_id: null,
    started_at: new Date().toISOString(), ended_at: null, ended_reason: null,
  };
  for (const status of ['queued', 'ringing']) {
    const id = await publish({ ...call, status });
    step(`published ${callId} ${status} (event ${id}) through the proxy`);
    await waitText(`${row} td.status`, status, `call ${status} over the fallback`);
  }
  // Once the fallback is up the page tries a WebSocket again; that fails too, and it stays.
  if (consoleLines.filter(wsFailed).length <= failedBefore) {
    try {
      await page.waitForEvent('console', { predicate: (m) => wsFailed(m.text()), timeout: STEP_MS });
    } catch (e) {
      if (!/Timeout/i.test(e.message)) throw e;
      fail(`still on the fallback: the page did not try a WebSocket again within ${STEP_MS} ms`);
    }
  }
  step('still on the fallback: the WebSocket tried again after the fallback came up failed too');
  await waitText('#status', 'open (fallback)', 'still on the fallback');
  await screenshot('dashboard-sse');
}

// ---- scenarios restart-drain, restart-kill ------------------------------------------------------
// The test process answers each `ACTION ...` line with `DONE` on our stdin once it is done.
const stdinLines = [];
let stdinWaiter = null;
createInterface({ input: process.stdin }).on('line', (line) => {
  if (stdinWaiter) { const w = stdinWaiter; stdinWaiter = null; w(line); } else stdinLines.push(line);
});
async function action(words) {
  step(`asking the test to ${words}`);
  console.log(`ACTION ${words}`);
  const reply = stdinLines.length ? stdinLines.shift() : await new Promise((resolve) => { stdinWaiter = resolve; });
  if (reply !== 'DONE') fail(`ACTION ${words}: the test answered ${JSON.stringify(reply)}`);
  step(`done: ${words}`);
}

// The pod (index into SB_PODS) that holds the page's one socket, from each pod's own /metrics.
async function podOfThePage(pods) {
  const deadline = Date.now() + STEP_MS;
  let seen = [];
  while (Date.now() < deadline) {
    seen = await Promise.all(pods.map(async (pod) => {
      const text = await (await fetch(new URL('/metrics', pod))).text();
      const line = text.split('\n').find((l) => l.startsWith('switchboard_connections '));
      return line ? Number(line.split(' ')[1]) : 0;
    }));
    if (seen.filter((n) => n === 1).length === 1 && seen.reduce((a, b) => a + b, 0) === 1) return seen.indexOf(1);
    await new Promise((r) => setTimeout(r, 50));
  }
  fail(`no single pod holds the page's socket: switchboard_connections per pod ${JSON.stringify(seen)}`);
}

async function scenarioRestart(kind) {
  const pods = (process.env.SB_PODS || '').split(',').filter(Boolean);
  if (pods.length !== 2) fail(`SB_PODS must name the two pods behind ${base}, got ${JSON.stringify(process.env.SB_PODS)}`);
  // Fake timers that run in real time until paused (see the header).
  await page.clock.install();
  await page.goto(new URL('/', hub).href, { waitUntil: 'domcontentloaded' });
  step(`opened ${page.url()} (nginx in front of ${pods.join(' and ')})`);
  await waitText('#status', 'refused', 'no session');
  await page.fill('#login-user', USER);
  await page.fill('#login-org', ORG);
  await page.click('#login-submit');
  await waitText('#status', 'open', 'after login');
  await waitText('#log', /\{"type":"subscribed","topic":"calls"\}/, 'subscription confirmed');

  // Everything the page receives and sends from now on, and every word its status pill shows.
  await page.evaluate(() => {
    const seen = window.__seen = { events: [], frames: [], statuses: [] };
    const sb = window.sb;
    const onEvent = sb.onEvent, onFrame = sb.onFrame;
    sb.onEvent = (e) => { seen.events.push({ id: e.id, call_id: e.data && e.data.call_id, status: e.data && e.data.status }); onEvent(e); };
    sb.onFrame = (dir, f) => { seen.frames.push([dir, f]); onFrame(dir, f); };
    const pill = document.getElementById('status');
    new MutationObserver(() => seen.statuses.push(pill.textContent)).observe(pill, { childList: true, characterData: true, subtree: true });
  });

  const run = `${kind}-${process.pid}-${Date.now()}`;
  const published = []; // {id, call_id, status}, in publishing order
  const call = (id, status) => ({
    call_id: `${run}-${id}`, direction: 'inbound', from: '+15550100', to: '+15550199',
    agent_id: status === 'queued' ? null : USER, started_at: new Date().toISOString(),
    ended_at: status === 'ended' ? new Date().toISOString() : null,
    ended_reason: status === 'ended' ? 'customer-ended-call' : null, status,
  });
  async function publishCall(id, status, when) {
    const data = call(id, status);
    const eventId = await publish(data);
    published.push({ id: eventId, call_id: data.call_id, status });
    step(`published ${data.call_id} ${status} (event ${eventId}) ${when}`);
  }
  const row = (id) => `#calls tr[data-call-id="${run}-${id}"] td.status`;

  // Live before the restart.
  await publishCall('a', 'queued', 'live');
  await publishCall('a', 'ringing', 'live');
  await waitText(row('a'), 'ringing', 'live before the restart');
  const lastBefore = published.at(-1).id;

  const victim = await podOfThePage(pods);
  step(`the page's socket is on pod ${victim} (${pods[victim]})`);
  // Pause the page's timers: from here it can notice the close but not reconnect.
  const pageNow = await page.evaluate(() => Date.now());
  await page.clock.pauseAt(pageNow + 1000);
  await action(`stop ${victim}`);
  await waitText('#status', 'reconnecting', `pod ${victim} ${kind === 'drain' ? 'drained' : 'killed'}`);
  await waitVisible('#retry', 'reconnecting', false);
  const closes = await page.evaluate(() => window.__seen.frames.filter(([d]) => d === 'in').map(([, f]) => f.type));
  if (kind === 'drain' && !closes.includes('reconnect')) {
    fail(`drained: the page never got {"type":"reconnect"}; frames in: ${JSON.stringify(closes)}`);
  }
  await screenshot(`dashboard-${scenario}-reconnecting`);

  // Published while the page is away: through nginx, to the pod still up, then to both.
  await publishCall('a', 'in-progress', 'while the page is away');
  await publishCall('b', 'queued', 'while the page is away');
  await action(`start ${victim}`);
  await publishCall('b', 'ringing', 'while the page is away, its pod back');
  const shownWhileAway = await page.evaluate((ids) => window.__seen.events.filter((e) => ids.includes(e.id)).length,
    published.slice(-3).map((p) => p.id));
  if (shownWhileAway) fail(`the page received ${shownWhileAway} event(s) while it was supposed to be disconnected`);

  // Let the page's time run again: it reconnects and catches up.
  await page.clock.resume();
  step('page clock resumed');
  await waitText('#status', 'open', 'reconnected', FALLBACK_MS);
  await waitText(row('a'), 'in-progress', 'caught up');
  await waitText(row('b'), 'ringing', 'caught up');
  // Live after the restart.
  await publishCall('a', 'ended', 'live after the restart');
  await publishCall('b', 'in-progress', 'live after the restart');
  await waitText(row('a'), 'ended', 'live after the restart');
  await waitText(row('b'), 'in-progress', 'live after the restart');

  const seen = await page.evaluate(() => window.__seen);
  // It resumed where it was: `since` = the last event it had, and history reached back.
  const resubscribe = seen.frames.find(([d, f]) => d === 'out' && f.type === 'subscribe' && f.topic === 'calls');
  if (!resubscribe || resubscribe[1].since !== lastBefore) {
    fail(`after reconnecting the page subscribed with ${JSON.stringify(resubscribe && resubscribe[1])}, want since ${lastBefore}`);
  }
  const subscribed = seen.frames.find(([d, f]) => d === 'in' && f.type === 'subscribed' && f.topic === 'calls');
  if (!subscribed || subscribed[1].recovered !== true) {
    fail(`after reconnecting the hub answered ${JSON.stringify(subscribed && subscribed[1])}, want recovered: true`);
  }
  // Every event published (before, during and after the restart), once and in order, with
  // its call and state.
  const want = published;
  const got = seen.events.filter((e) => e.call_id && e.call_id.startsWith(run));
  const fmt = (l) => l.map((e) => `${e.id} ${e.call_id.slice(run.length + 1)}=${e.status}`).join(', ');
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    fail(`events received:\n    ${fmt(got)}\n  want (as published):\n    ${fmt(want)}`);
  }
  step(`every event arrived once, in order: ${fmt(got)}`);
  const words = seen.statuses.filter((w, i, all) => i === 0 || all[i - 1] !== w);
  if (!words.includes('reconnecting') || words.at(-1) !== 'open') fail(`status pill went ${JSON.stringify(words)}`);
  step(`status pill went ${words.join(' -> ')}`);
  await screenshot(`dashboard-${scenario}`);
}

// ---- run ---------------------------------------------------------------------------------------
const overall = setTimeout(() => {
  console.error(`FAIL dashboard ${scenario}: the whole run took longer than ${OVERALL_MS} ms`);
  Promise.resolve(context && context.close()).catch(() => {}).finally(() => process.exit(1));
}, OVERALL_MS);

let code = 0;
try {
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 800 },
    timeout: 20000,
  });
  step(`chromium ${context.browser() ? context.browser().version() : ''} started (profile ${profileDir})`);
  page = context.pages()[0] || await context.newPage();
  page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => pageErrors.push(String(e && e.stack || e)));

  if (scenario === 'login') await scenarioLogin();
  else if (scenario === 'sse') await scenarioSse();
  else if (scenario.startsWith('restart-')) await scenarioRestart(scenario.slice('restart-'.length));
  else await scenarioOrigin();

  if (pageErrors.length) fail(`uncaught errors in the page:\n  ${pageErrors.join('\n  ')}`);
  // The browser logs each failed handshake of the deliberately blocked socket (SSE fallback);
  // behind the proxy that strips the upgrade every /ws fails, and GET /sse without a session
  // is refused 401.
  const expected = scenario === 'sse'
    ? (l) => l.includes("/ws' failed") || l.includes('the server responded with a status of 401')
    : (l) => l.includes("/ws-blocked-by-proxy' failed");
  const consoleErrors = consoleLines.filter((l) => l.startsWith('error: ') && !expected(l));
  if (consoleErrors.length) fail(`errors in the browser console:\n  ${consoleErrors.join('\n  ')}`);
  console.log(`PASS dashboard ${scenario} (${((Date.now() - started) / 1000).toFixed(1)} s); screenshots in ${outDir}`);
} catch (e) {
  code = 1;
  console.error(`FAIL dashboard ${scenario}: ${e instanceof TestFailure ? e.message : (e && e.stack || e)}`);
  console.error('page state:\n' + await pageState());
  if (consoleLines.length) console.error('browser console:\n  ' + consoleLines.slice(-30).join('\n  '));
  if (pageErrors.length) console.error('uncaught page errors:\n  ' + pageErrors.join('\n  '));
  if (page) await screenshot(`dashboard-${scenario}-failure`).catch(() => {});
} finally {
  clearTimeout(overall);
  if (context) await context.close().catch(() => {});
  rmSync(profileDir, { recursive: true, force: true });
}
process.exit(code);
