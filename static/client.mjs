// switchboard browser client as an ES module: `import { Switchboard } from '/client.mjs'`.
// The client itself is /client.js (a classic script, no build step); importing it runs it
// once and it sets globalThis.Switchboard, which this module re-exports.
import './client.js';

export const Switchboard = globalThis.Switchboard;
export default Switchboard;
