// Compiled by `tsc --noEmit -p types-check`: the README's uses of the
// package, through its published entry points (package.json "exports").
// The lines marked @ts-expect-error must stay errors.

import { ClosedError, GatewayClient, QueueFullError, RELIABLE_SUBPROTOCOL, RequestTimeoutError, decide } from '@gateway/client';
import type { GatewayOptions, Message, State } from '@gateway/client';
import { useGateway } from '@gateway/client/react';

const options: GatewayOptions = {
  getToken: async () => 'eyJ...',
  tokenIn: 'subprotocol',
  backoff: { baseMs: 250, maxMs: 10_000 },
  maxQueue: 100,
  overflow: 'dropOldest',
};
const client = new GatewayClient(() => 'wss://gateway.example.com/chat', options);

client.on('state', ({ from, to }) => {
  const s: State = to;
  console.log(from, s);
});
client.on('open', ({ resumed }) => console.log(resumed ? 'resumed' : 'new session'));
client.on('message', (data) => {
  if (typeof data === 'string') {
    console.log(data.toUpperCase());
  } else {
    console.log(data.byteLength);
  }
});
const off = client.on('close', ({ code, reason, willRetry }) => console.log(code, reason, willRetry));
off();
client.on('resumeFailed', ({ reason }) => console.log(reason));
client.on('dropped', ({ data }) => console.log(data));
client.on('error', (error) => console.log(error.message));

client.send('hello');
client.send(new Uint8Array([1, 2, 3]));
client.send(new ArrayBuffer(8));

interface Pong { id: string; type: 'pong'; at: number }
async function main(): Promise<void> {
  const reply = await client.request<Pong>({ type: 'ping' }, { timeoutMs: 2000 });
  const at: number = reply.at;
  console.log(at);
  for await (const m of client) {
    const msg: Message = m;
    console.log(msg);
    break;
  }
  for await (const m of client.messages({ maxBuffered: 10 })) {
    console.log(m);
  }
  try {
    client.send('x');
  } catch (e) {
    if (e instanceof QueueFullError || e instanceof ClosedError || e instanceof RequestTimeoutError) {
      console.log(e.message);
    }
  }
  await client.close(1000, 'bye');
}
void main();

const d = decide({ code: 1012, reason: 'resume=abc', opened: true });
if (d.action === 'resume') {
  const token: string = d.token;
  console.log(token);
}

function Chat(): string {
  const { state, lastMessage, send } = useGateway('wss://gateway.example.com/chat', {
    token: 'eyJ...',
    onMessage: (data) => console.log(data),
  });
  if (state === 'open') {
    send('hi');
  }
  return typeof lastMessage === 'string' ? lastMessage : '';
}
console.log(Chat);

const reliable = new GatewayClient('wss://gateway.example.com/chat', { reliable: 'require', maxQueue: 500 });
reliable.on('resumeFailed', ({ reason }) => console.log(RELIABLE_SUBPROTOCOL, reason));
const unacked: number = reliable.unacked;
console.log(unacked, decide({ code: 1006, reason: '', opened: true, reliableToken: 't' }).action);
// @ts-expect-error: reliable is 'prefer' or 'require'
new GatewayClient('wss://x', { reliable: true });

// @ts-expect-error: an unknown event name
client.on('opened', () => {});
// @ts-expect-error: a number is not a message
client.send(42);
// @ts-expect-error: headers cannot be set by a browser; the token goes in the query or a subprotocol
new GatewayClient('wss://x', { tokenIn: 'header' });
// @ts-expect-error: open carries {resumed}, not a string
client.on('open', (e: string) => console.log(e));
