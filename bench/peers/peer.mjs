// A peer fan-out server the bench measures beside the hub and its floor (BENCHMARKS.md,
// issue 15): `node bench/peers/peer.mjs uws|ws`. It speaks the part of the hub's protocol the
// bench's client uses: on open a `welcome`, on `{"type":"subscribe","topic":T}` the socket
// joins topic T and gets `subscribed`; then every line on stdin (`topic seq g ph t`, as the
// floor reads them) becomes one event frame published to topic "fan", to every subscriber.
// `uws`: uWebSockets.js (C++), its own pub/sub (`app.publish`), no compression, no idle
// timeout and no pings (the floor sends none either). `ws`: the Node `ws` package, a Set of
// subscribers per topic and one `send` each. It prints `listening 127.0.0.1:PORT` first and
// exits when stdin closes.

import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const require = createRequire(import.meta.url);
const kind = process.argv[2];
const TOPIC = "fan";

function eventPayload(line) {
  const f = line.trim().split(/\s+/);
  if (f.length !== 5) return null;
  const [, seq, g, ph, t] = f;
  return `{"type":"event","topic":"fan","id":"0-${seq}","event":"bench","data":{"seq":${seq},"g":${g},"ph":${ph},"t":${t}}}`;
}

const WELCOME = '{"type":"welcome","conn_id":"peer","user":"peer","org":"peer","heartbeat_ms":0}';
const subscribed = (topic) => `{"type":"subscribed","topic":${JSON.stringify(topic)}}`;

function subscribeTopic(text) {
  try {
    const msg = JSON.parse(text);
    return msg.type === "subscribe" && typeof msg.topic === "string" ? msg.topic : null;
  } catch {
    return null;
  }
}

function onLines(publish) {
  const rl = createInterface({ input: process.stdin });
  rl.on("line", (line) => {
    const payload = eventPayload(line);
    if (payload !== null) publish(payload);
  });
  rl.on("close", () => process.exit(0));
}

function startUws() {
  // The native build for this Node's ABI, loaded directly: the package's own entry point falls
  // back silently to a JavaScript implementation when none fits, which would measure Node, not uWS.
  const binary = `@trufflesuite/uws-js-unofficial/binaries/uws_${process.platform}_${process.arch}_${process.versions.modules}.node`;
  const uws = require(binary);
  const decoder = new TextDecoder();
  const app = uws.App().ws("/*", {
    compression: uws.DISABLED,
    maxPayloadLength: 16 * 1024,
    idleTimeout: 0,
    sendPingsAutomatically: false,
    open: (ws) => {
      ws.send(WELCOME, false);
    },
    message: (ws, message, isBinary) => {
      if (isBinary) return;
      const topic = subscribeTopic(decoder.decode(message));
      if (topic === null) return;
      ws.subscribe(topic);
      ws.send(subscribed(topic), false);
    },
  });
  app.listen("127.0.0.1", 0, (listenSocket) => {
    if (!listenSocket) {
      console.error("peer uws: listen failed");
      process.exit(1);
    }
    console.log(`listening 127.0.0.1:${uws.us_socket_local_port(listenSocket)}`);
  });
  onLines((payload) => app.publish(TOPIC, payload, false));
}

function startWs() {
  const { WebSocketServer } = require("ws");
  const topics = new Map();
  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: 0,
    backlog: 4096,
    perMessageDeflate: false,
    clientTracking: false,
  });
  wss.on("connection", (ws) => {
    ws._socket.setNoDelay(true);
    const joined = [];
    ws.send(WELCOME);
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      const topic = subscribeTopic(data.toString());
      if (topic === null) return;
      if (!topics.has(topic)) topics.set(topic, new Set());
      topics.get(topic).add(ws);
      joined.push(topic);
      ws.send(subscribed(topic));
    });
    ws.on("close", () => {
      for (const t of joined) topics.get(t)?.delete(ws);
    });
    ws.on("error", () => {});
  });
  wss.on("listening", () => console.log(`listening 127.0.0.1:${wss.address().port}`));
  onLines((payload) => {
    const subscribers = topics.get(TOPIC);
    if (!subscribers) return;
    for (const ws of subscribers) ws.send(payload);
  });
}

if (kind === "uws") startUws();
else if (kind === "ws") startWs();
else {
  console.error("usage: node peer.mjs uws|ws");
  process.exit(2);
}
