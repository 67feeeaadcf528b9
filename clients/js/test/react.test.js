// useGateway rendered by react-dom into a jsdom document, against a real
// WebSocket server; what the test checks is what the DOM shows. No
// WebSocket option: on Node 20 the client imports the ws package itself.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { JSDOM } from 'jsdom';

import { startServer, until } from './_support.js';

const dom = new JSDOM('<!doctype html><html><body></body></html>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
if (!('navigator' in globalThis)) {
  globalThis.navigator = dom.window.navigator;
}
// Updates come from socket events, as in an application, not from act().
globalThis.IS_REACT_ACT_ENVIRONMENT = false;

const React = await import('react');
const { createRoot } = await import('react-dom/client');
const { flushSync } = await import('react-dom');
const { useGateway } = await import('@gateway/client/react');

const h = React.createElement;

let server;
const closes = [];   // close code of each server-side connection
before(async () => {
  server = await startServer({
    onConnection: ({ socket }) => {
      socket.on('message', (data) => socket.send(`echo:${data}`));
      socket.on('close', (code) => closes.push(code));
    },
  });
});
after(async () => {
  await server.close();
});

function Chat({ url, seen }) {
  const { state, lastMessage, send } = useGateway(url, { onMessage: (m) => seen.push(m) });
  return h('div', null,
    h('p', { id: 'state' }, state),
    h('p', { id: 'last' }, lastMessage ?? ''),
    h('button', { id: 'send', onClick: () => send('ping') }, 'send'));
}

function mount(props) {
  const container = document.createElement('div');
  document.body.append(container);
  const root = createRoot(container);
  const render = (p) => flushSync(() => root.render(h(Chat, p)));
  render(props);
  const text = (id) => container.querySelector(`#${id}`).textContent;
  return { container, root, render, text };
}

test('the hook shows the state, sends on a click, shows the reply, and closes on unmount', async () => {
  const seen = [];
  const before = server.connections.length;
  const { container, root, text } = mount({ url: server.url, seen });
  assert.equal(text('state'), 'connecting');
  await until(() => text('state') === 'open', 'state open in the DOM');
  for (let i = 0; i < 3; i++) {
    container.querySelector('#send').dispatchEvent(new window.MouseEvent('click', { bubbles: true }));
  }
  await until(() => seen.length === 3, 'three replies');
  assert.deepEqual(seen, ['echo:ping', 'echo:ping', 'echo:ping']);
  await until(() => text('last') === 'echo:ping', 'the last message in the DOM');
  assert.equal(server.connections.length, before + 1);
  const closed = closes.length;
  root.unmount();
  await until(() => closes.length === closed + 1, 'the server saw the close');
  assert.equal(closes.at(-1), 1000);
});

test('a new url makes a new connection and closes the old one; null disconnects', async () => {
  const seen = [];
  const first = `${server.url}?room=a`;
  const { render, text, root } = mount({ url: first, seen });
  await until(() => text('state') === 'open', 'open on room a');
  const closed = closes.length;
  render({ url: `${server.url}?room=b`, seen });
  await until(() => closes.length === closed + 1, 'room a closed');
  await until(() => text('state') === 'open', 'open on room b');
  assert.equal(server.connections.at(-1).url.searchParams.get('room'), 'b');
  render({ url: null, seen });
  await until(() => closes.length === closed + 2, 'room b closed');
  assert.equal(text('state'), 'closed');
  root.unmount();
});

test('under StrictMode (effects run twice) one connection stays open', async () => {
  const seen = [];
  const container = document.createElement('div');
  document.body.append(container);
  const root = createRoot(container);
  const opened = server.connections.length;
  const closed = closes.length;
  flushSync(() => root.render(h(React.StrictMode, null, h(Chat, { url: `${server.url}?strict=1`, seen }))));
  await until(() => container.querySelector('#state').textContent === 'open', 'open');
  container.querySelector('#send').dispatchEvent(new window.MouseEvent('click', { bubbles: true }));
  await until(() => seen.length === 1, 'one reply');
  const live = server.connections.slice(opened).filter((c) => c.socket.readyState === 1);
  assert.equal(live.length, 1);
  assert.ok(closes.length - closed <= 1);
  root.unmount();
  await until(() => server.connections.slice(opened).every((c) => c.socket.readyState === 3), 'all closed');
});
