#!/usr/bin/env node
// Screenshots of the live call board for the README (docs/board.png), taken in Debian's
// Chromium through tests/browser's playwright-core, at 1440x900, from a running hub whose
// demo simulator feeds org `demo` (what `cargo run --release` starts with config/default.toml):
//
//   cargo run --release &                       # or any hub with dev login and the simulator
//   node scripts/screenshots.mjs [http://localhost:8080] [docs]
//
// Signs in with the dev login, waits until the simulator has calls on the board in several
// states (queued or ringing, and in progress), lets a few more seconds of traffic arrive so
// durations and counters are lived-in, then writes <out dir>/board.png. Needs
// `npm ci --prefix tests/browser` (scripts/ensure-test-tools) and /usr/bin/chromium.
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const require = createRequire(new URL('../tests/browser/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const base = process.argv[2] || 'http://localhost:8080';
const outDir = process.argv[3] || new URL('../docs', import.meta.url).pathname;
const VIEWPORT = { width: 1440, height: 900 };
const CALLS_MS = 60000;  // bound on the simulator filling the board
const SETTLE_MS = 6000;  // more traffic after that, so the board looks like a working day

mkdirSync(outDir, { recursive: true });
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--force-color-profile=srgb'],
});
try {
  const page = await browser.newPage({ viewport: VIEWPORT, deviceScaleFactor: 1 });
  await page.goto(new URL('/', base).href);
  // A fresh browser has no session: the board asks to sign in (dev login).
  await page.locator('#login-submit').waitFor({ state: 'visible', timeout: 10000 });
  await page.fill('#login-user', 'agent-1');
  await page.fill('#login-org', 'demo');
  await page.click('#login-submit');
  await page.waitForFunction(() => document.getElementById('status').textContent === 'open', null, { timeout: 10000 });
  // Enough calls, in more than one state, to show what the board is for.
  await page.waitForFunction(() => {
    const states = Array.from(document.querySelectorAll('#calls tr[data-call-id] td.status'), (td) => td.textContent.trim());
    return states.length >= 6 && states.includes('in-progress') && states.some((s) => s === 'queued' || s === 'ringing');
  }, null, { timeout: CALLS_MS, polling: 500 });
  await page.waitForTimeout(SETTLE_MS);
  // The mouse rests where it hovers nothing, and nothing has the keyboard focus.
  await page.mouse.move(VIEWPORT.width - 1, VIEWPORT.height - 1);
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  const path = join(outDir, 'board.png');
  await page.screenshot({ path });
  console.log(`wrote ${path}`);
} finally {
  await browser.close();
}
