// Real-browser test of the voice test page (GET /voice-test), driven by playwright-core against
// Debian's chromium with its fake microphone. Run by tests/voice.rs, which starts the hub and
// `switchboard voice-echo` first:
//
//   node tests/browser/voice.mjs <hub base url> <scenario> [out dir]
//
// scenarios:
//   echo        the page is refused 4401 and shows the dev login (plain words, announced);
//               signed in it turns `open`; Start test streams the fake microphone, its frames
//               come back through the echo, and the page shows the round-trip p50/p95.
//   screenshot  the same, then keeps the test running for a few seconds so the chart fills,
//               and saves `voice.png` in the out dir (scripts/screenshot-voice.sh puts it in
//               docs/).
//
// Prints one line per step; on failure prints what went wrong with the page's state, takes a
// screenshot and exits 1. Every wait is on a condition in the page, bounded by a timeout.

import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // A synthetic microphone (a beep) and no permission prompt: what issue 14 asks for.
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--autoplay-policy=no-user-gesture-required',
];
const ORG = 'demo';
const USER = 'tester-1';
const STEP_MS = 5000;     // bound on each wait for something the page should show promptly
const ECHO_MS = 15000;    // bound on the first second of audio coming back
const FILL_MS = 9000;     // screenshot: how long the chart fills before the picture
const OVERALL_MS = 60000;

const [base, scenario, outArg] = process.argv.slice(2);
if (!base || !['echo', 'screenshot'].includes(scenario)) {
  console.error('usage: node voice.mjs <hub base url> <echo|screenshot> [out dir]');
  process.exit(2);
}
const hub = new URL(base);
const outDir = outArg || mkdtempSync(join(tmpdir(), 'sb-voice-'));
mkdirSync(outDir, { recursive: true });

const started = Date.now();
function step(msg) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s] ${msg}`);
}
class TestFailure extends Error {}
function fail(msg) { throw new TestFailure(msg); }

let context = null;
let page = null;
const consoleLines = [];

async function pageState() {
  if (!page) return '(no page)';
  try {
    return await page.evaluate(() => {
      const t = (id) => { const e = document.getElementById(id); return e ? JSON.stringify(e.textContent) : '(missing)'; };
      return [
        `  url ${location.href}`,
        `  #status ${t('status')} #status-detail ${t('status-detail')} #phase ${t('phase')}`,
        `  #help-title ${t('help-title')} #status-help ${t('status-help')}`,
        `  stats ${JSON.stringify(window.voiceTest && window.voiceTest.stats())}`,
      ].join('\n');
    });
  } catch (e) {
    return `(page state unavailable: ${e.message})`;
  }
}

async function waitText(selector, want, what, timeout = STEP_MS) {
  const spec = want instanceof RegExp ? { re: want.source, flags: want.flags } : { eq: want };
  try {
    await page.waitForFunction(({ selector, spec }) => {
      const el = document.querySelector(selector);
      if (!el) return false;
      const text = el.textContent.trim();
      return spec.re !== undefined ? new RegExp(spec.re, spec.flags).test(text) : text === spec.eq;
    }, { selector, spec }, { timeout, polling: 100 });
  } catch (e) {
    if (!/Timeout/i.test(e.message)) throw e;
    const got = await page.locator(selector).first().textContent().catch(() => '(unknown)');
    fail(`${what}: expected ${selector} to show ${want} within ${timeout} ms, it shows ${JSON.stringify(got)}`);
  }
  const text = (await page.locator(selector).first().textContent()).trim();
  step(`${what}: ${selector} = ${JSON.stringify(text)}`);
  return text;
}

async function screenshot(name) {
  const path = join(outDir, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  step(`screenshot ${path}`);
  return path;
}

async function run() {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  context = await browser.newContext({ viewport: { width: 1180, height: 760 }, deviceScaleFactor: 1 });
  await context.grantPermissions(['microphone'], { origin: hub.origin });
  page = await context.newPage();
  page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));

  await page.goto(new URL('/voice-test', hub).href, { waitUntil: 'domcontentloaded' });
  step(`opened ${page.url()}`);

  // No session yet: refused 4401, said in plain words and announced, login offered.
  await waitText('#status', 'refused', 'no session');
  const notSignedIn = 'You are not signed in: sign in to run a voice test.';
  await waitText('#status-help', notSignedIn, 'no session');
  const announced = await page.locator('#announce').textContent();
  if (!announced.includes(notSignedIn)) fail(`no session: the live region says ${JSON.stringify(announced)}`);
  await page.locator('#login').waitFor({ state: 'visible', timeout: STEP_MS });

  await page.fill('#login-user', USER);
  await page.fill('#login-org', ORG);
  await page.click('#login-submit');
  await waitText('#status', 'open', 'signed in');
  await waitText('#who-org', ORG, 'signed in');
  await waitText('#phase', 'Ready: press Start test and speak.', 'signed in');
  const label = await page.evaluate(() => document.getElementById('start').textContent.trim());
  if (label !== 'Start test') fail(`the start button says ${JSON.stringify(label)}`);

  await page.click('#start');
  step('pressed Start test');
  await waitText('#phase', 'Your audio is coming back through the hub.', 'echo', ECHO_MS);
  try {
    await page.waitForFunction(() => window.voiceTest.stats().back >= 50, null, { timeout: ECHO_MS, polling: 100 });
  } catch (e) {
    fail(`fewer than 50 frames (1 s of audio) came back within ${ECHO_MS} ms`);
  }
  const p50 = await waitText('#rtt-p50', /^\d+(\.\d)?$/, 'round trip shown');
  const p95 = await waitText('#rtt-p95', /^\d+(\.\d)?$/, 'round trip shown');
  if (Number(p95) < Number(p50)) fail(`p95 ${p95} ms is below p50 ${p50} ms`);
  if (Number(p50) > 1000) fail(`round trip p50 ${p50} ms: over a second on loopback`);
  await checkHeard();

  if (scenario === 'screenshot') {
    await page.waitForTimeout(FILL_MS); // the chart covers the last 10 s: let it fill
    await page.evaluate(() => document.activeElement && document.activeElement.blur());
    await screenshot('voice');
  }
  const stats = await page.evaluate(() => window.voiceTest.stats());
  step(`stats ${JSON.stringify(stats)}`);
  await page.click('#start');
  await waitText('#start', 'Start test', 'stopped');
  await browser.close();
  console.log(`RTT p50 ${p50} ms p95 ${p95} ms over ${stats.samples} frames`);
}

// The fake microphone beeps: the echo must carry sound, not silence.
async function checkHeard() {
  try {
    await page.waitForFunction(() => window.voiceTest.stats().echoPeak > 0.05, null, { timeout: ECHO_MS, polling: 100 });
  } catch (e) {
    fail('the echoed audio stayed silent: the fake microphone\'s beep never came back');
  }
  step(`echo carries sound: peak ${(await page.evaluate(() => window.voiceTest.stats().echoPeak)).toFixed(2)}`);
}

const overall = setTimeout(() => {
  console.error(`FAIL voice ${scenario}: still running after ${OVERALL_MS} ms`);
  process.exit(1);
}, OVERALL_MS);

try {
  await run();
  console.log(`PASS voice ${scenario}`);
} catch (e) {
  console.error(`FAIL voice ${scenario}: ${e instanceof TestFailure ? e.message : e.stack}`);
  console.error(await pageState());
  if (consoleLines.length) console.error('console:\n  ' + consoleLines.slice(-20).join('\n  '));
  if (page) await screenshot('voice-failure').catch(() => {});
  process.exitCode = 1;
} finally {
  clearTimeout(overall);
  if (context) await context.browser().close().catch(() => {});
}
