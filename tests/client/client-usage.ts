// A TypeScript program written against static/client.d.ts the way an application would use
// the client; tests/client_js.rs compiles it with `tsc --noEmit --strict`. Each
// `@ts-expect-error` marks a misuse the declarations must reject: if one stops being an error
// (a type loosened to `any`, a status or code dropped), tsc fails on the unused directive.
import Default, { Switchboard } from '../../static/client.js';
import type { StatusArgs, SwitchboardEvent, Welcome } from '../../static/client.js';

interface CallStatus {
  call_id: string;
  status: 'queued' | 'ringing' | 'in-progress' | 'forwarding' | 'ended';
}

const log: string[] = [];

const sb: Switchboard = new Switchboard({
  url: 'wss://hub.example/ws',
  onEvent(event: SwitchboardEvent) {
    const id: string = event.id;
    const call = event.data as CallStatus;
    log.push(`${event.topic} ${id} ${call.call_id}=${call.status}`);
  },
  onStatus(...args: StatusArgs) {
    const [status, detail] = args;
    switch (status) {
      case 'open': {
        const welcome: Welcome = detail;
        log.push(`open as ${welcome.user}/${welcome.org} over ${detail.transport}${detail.fallback ? ` (${detail.fallback})` : ''}`);
        break;
      }
      case 'refused': {
        // Checking the status narrows the detail: a refusal is 4401 or 4403, nothing else.
        const code: 4401 | 4403 = detail.code;
        log.push(`refused ${code}: ${detail.reason}`);
        break;
      }
      case 'reconnect-scheduled':
        log.push(`retry in ${detail.delay} ms (attempt ${detail.attempt})`);
        break;
      case 'closed':
        log.push(`closed ${detail.code}, retry ${detail.willRetry}`);
        break;
      case 'resync':
        log.push(`reload ${detail.topic}`);
        break;
      default:
        break;
    }
  },
  onWelcome(info) { log.push(info.conn_id); },
  onFrame(direction, frame) { log.push(`${direction} ${frame.type}`); },
  random: () => 0.5,
  clock: { now: () => 0 },
});

sb.subscribe('calls').subscribe('call:abc', { binary: true }).connect();
const sent: boolean = sb.publish('call:abc', { note: 'hi' }, 'note');
const order: -1 | 0 | 1 | null = Switchboard.compareIds('1700000000000-0', '1700000000000-1');
const sameClass: typeof Switchboard = Default;
const fromWindow: typeof Switchboard = window.Switchboard;
sb.close();
log.push(String(sent), String(order), sameClass.name, fromWindow.name, sb.status, sb.transport);

// @ts-expect-error the status is read-only
sb.status = 'open';
// @ts-expect-error subscribe takes a topic name
sb.subscribe(42);
// @ts-expect-error no such option
new Switchboard({ onEvnt() {} });
new Switchboard({
  onStatus(...args: StatusArgs) {
    // @ts-expect-error a refusal's detail has no willRetry
    if (args[0] === 'refused') log.push(String(args[1].willRetry));
  },
});
