// The chat page. The project's JS client (clients/js/src, served by the demo
// backend at /client/) connects to the gateway with a JWT from the backend's
// demo-only /token endpoint. Every message the page sends is JSON:
//   {type: 'join' | 'leave' | 'who', room}   {type: 'say', room, text}
// The gateway POSTs it to the backend (HTTP backend mode); the backend
// publishes chat lines to the room's channel, so they come back to every
// member, this page included, as {type: 'message', room, id, from, text, ts}.
//
// A drained gateway node closes the socket with 1012 and a resume token; the
// client comes back (to any node) with it, and the gateway delivers what was
// sent meanwhile, in order, and restores the session's rooms: the page does
// nothing. Only a session that could not be resumed (resumeFailed) joins its
// rooms again, and their history is sent again: lines already shown are
// recognised by their id.
//
// `?reliable=require` (or `prefer`) turns on the client's reliable mode, for a
// gateway route with `reliable:` (docs/reliable.md): then a connection that
// dies without a close (wifi lost) is resumed too, nothing lost or twice.
//
// `window.chat` is the page's state, for the browser console (and the tests):
// chat.say('hi'), chat.received (every chat line as it arrived), chat.closes.

import { GatewayClient } from '/client/index.js';

const $ = (id) => document.getElementById(id);
const MAX_SHOWN = 500;         // lines kept on screen per room
const MAX_RECEIVED = 100_000;  // arrivals kept in chat.received
const ROOM = /^[a-z0-9_-]{1,32}$/;
const USER = /^[A-Za-z0-9_.-]{1,32}$/;
// null (off), 'prefer' or 'require'; anything else is refused by the client, shown on the login form.
const RELIABLE = new URLSearchParams(location.search).get('reliable');

const chat = {
  user: null,
  room: null,            // the room on screen
  rooms: new Map(),      // name -> {lines: [], ids: Set, members: [], joined: bool}
  state: 'closed',
  client: null,
  sent: 0,               // say() calls taken by the client (sent or queued)
  received: [],          // every chat line as it arrived: {room, id, from, text}
  closes: [],            // {code, reason, willRetry} per socket close
  opens: [],             // {resumed} per socket open
  resumeFailures: [],
  errors: [],            // what the backend answered with {type: 'error'}
  say,
  join,
  leave,
  start,
};
window.chat = chat;

async function fetchJson(path) {
  const r = await fetch(path, { cache: 'no-store' });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    throw new Error(body.error ?? `${path}: HTTP ${r.status}`);
  }
  return body;
}

async function tokenFor(user) {
  return (await fetchJson(`/token?user=${encodeURIComponent(user)}`)).token;
}

/** Log in as `user` and enter `room`. */
async function start(user, room) {
  if (chat.client !== null) {
    throw new Error('already started');
  }
  if (!USER.test(user) || !ROOM.test(room)) {
    throw new Error('name: 1-32 letters, digits, _ . -; room: 1-32 of a-z 0-9 _ -');
  }
  const [config, token] = await Promise.all([fetchJson('/config.json'), tokenFor(user)]);
  const urls = config.gateways;
  let next = Math.floor(Math.random() * urls.length);
  chat.user = user;
  addRoom(room);
  showRoom(room);
  $('who').textContent = user;
  // With several gateway URLs each attempt takes the next: a resume after a
  // drain may land on any node (a draining one answers 503 and the client
  // tries again).
  const client = new GatewayClient(() => urls[next++ % urls.length], {
    token,
    getToken: () => tokenFor(user),   // asked again when the gateway refuses the token (expired)
    reliable: RELIABLE,
  });
  chat.client = client;
  client.on('state', ({ to }) => showState(to));
  client.on('open', opened);
  client.on('close', closed);
  client.on('resumeFailed', ({ reason }) => {
    chat.resumeFailures.push(reason);
    status(`could not resume (${reason}): a new session; the rooms are joined again`);
  });
  client.on('message', received);
  client.on('error', (error) => console.debug('gateway client:', error.message));
  return client;
}

function opened({ resumed }) {
  chat.opens.push({ resumed });
  if (resumed) {
    status('resumed: the session is back, with what was sent meanwhile');
    return;
  }
  status('connected');
  for (const name of chat.rooms.keys()) {
    send({ type: 'join', room: name });
  }
}

function closed({ code, reason, willRetry }) {
  const resuming = reason.startsWith('resume=');
  chat.closes.push({ code, reason: resuming ? 'resume=...' : reason, willRetry });
  if (resuming) {
    status(`the gateway node is going away (${code}): resuming on another one`);
  } else if (willRetry) {
    status(`connection lost (${code}${reason ? ` ${reason}` : ''}): reconnecting`);
  } else {
    status(`closed (${code}${reason ? ` ${reason}` : ''}): ${chat.client.closeReason ?? ''}`);
  }
}

function send(message) {
  chat.client.send(JSON.stringify(message));
}

/** Say `text` in `room` (default: the room on screen). */
function say(text, room = chat.room) {
  send({ type: 'say', room, text });
  chat.sent += 1;
}

function join(room) {
  if (!ROOM.test(room)) {
    throw new Error('room: 1-32 of a-z 0-9 _ -');
  }
  if (!chat.rooms.has(room)) {
    addRoom(room);
    send({ type: 'join', room });
  }
  showRoom(room);
}

function leave(room = chat.room) {
  send({ type: 'leave', room });
}

function received(data) {
  let m;
  try {
    m = JSON.parse(data);
  } catch {
    status(`not JSON: ${String(data).slice(0, 80)}`);
    return;
  }
  const r = chat.rooms.get(m.room);
  switch (m.type) {
    case 'welcome':
      $('who').textContent = m.user;
      break;
    case 'message':
      if (chat.received.length < MAX_RECEIVED) {
        chat.received.push({ room: m.room, id: m.id, from: m.from, text: m.text });
      }
      if (r !== undefined && !r.ids.has(m.id)) {
        addLine(m.room, r, m);
      }
      break;
    case 'joined':
    case 'members':
      if (r !== undefined) {
        r.joined = true;
        r.members = m.members;
        if (m.room === chat.room) {
          renderMembers(r);
        }
        renderRooms();
      }
      break;
    case 'left':
      removeRoom(m.room);
      break;
    case 'error':
      chat.errors.push(m.error);
      if (r !== undefined) {
        addLine(m.room, r, { system: true, text: `error: ${m.error}` });
      } else {
        status(`error: ${m.error}`);
      }
      break;
    default:
      console.debug('unknown message', m);
  }
}

// ---- the screen

function addRoom(name) {
  chat.rooms.set(name, { lines: [], ids: new Set(), members: [], joined: false });
  renderRooms();
}

function removeRoom(name) {
  chat.rooms.delete(name);
  if (chat.room === name) {
    showRoom(chat.rooms.keys().next().value ?? null);
  }
  renderRooms();
}

function addLine(name, r, m) {
  r.lines.push(m);
  if (m.id !== undefined) {
    r.ids.add(m.id);
  }
  if (r.lines.length > MAX_SHOWN) {
    const gone = r.lines.splice(0, r.lines.length - MAX_SHOWN);
    for (const old of gone) {
      r.ids.delete(old.id);
    }
  }
  if (name === chat.room) {
    const list = $('messages');
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    list.append(lineElement(m));
    while (list.childElementCount > MAX_SHOWN) {
      list.firstElementChild.remove();
    }
    if (atBottom) {
      list.scrollTop = list.scrollHeight;
    }
  }
}

function lineElement(m) {
  const li = document.createElement('li');
  if (m.system) {
    li.className = 'system';
    li.textContent = m.text;
    return li;
  }
  li.className = m.from === chat.user ? 'line mine' : 'line';
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = m.from;
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = m.text;
  const time = document.createElement('time');
  const at = new Date(m.ts * 1000);
  time.dateTime = at.toISOString();
  time.textContent = at.toLocaleTimeString();
  li.append(from, text, time);
  return li;
}

function showRoom(name) {
  chat.room = name;
  $('room-name').textContent = name === null ? 'No room: join one' : `#${name}`;
  $('leave').hidden = name === null;
  $('composer').hidden = name === null;
  const r = name === null ? undefined : chat.rooms.get(name);
  $('messages').replaceChildren(...(r?.lines ?? []).map(lineElement));
  $('messages').scrollTop = $('messages').scrollHeight;
  renderMembers(r);
  renderRooms();
}

function renderRooms() {
  const items = [...chat.rooms.keys()].map((name) => {
    const li = document.createElement('li');
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = `#${name}`;
    if (name === chat.room) {
      b.setAttribute('aria-current', 'true');
    }
    b.addEventListener('click', () => showRoom(name));
    li.append(b);
    return li;
  });
  $('rooms').replaceChildren(...items);
}

function renderMembers(r) {
  const members = r?.members ?? [];
  $('member-count').textContent = r === undefined ? '' : String(members.length);
  $('members').replaceChildren(...members.map((name) => {
    const li = document.createElement('li');
    li.textContent = name;
    if (name === chat.user) {
      li.className = 'me';
    }
    return li;
  }));
}

function showState(state) {
  chat.state = state;
  const el = $('state');
  el.textContent = state;
  el.dataset.state = state;
  el.className = `state state-${state}`;
}

function status(text) {
  $('status-line').textContent = text;
}

// ---- the forms

async function enter(user, room) {
  $('login-error').textContent = '';
  try {
    await start(user, room);
  } catch (error) {
    $('login-error').textContent = error.message;
    return;
  }
  $('login').hidden = true;
  $('chat').hidden = false;
  $('text').focus();
}

$('login').addEventListener('submit', (event) => {
  event.preventDefault();
  enter($('login-user').value.trim(), $('login-room').value.trim());
});

$('composer').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = $('text').value.trim();
  if (text === '') {
    return;
  }
  try {
    say(text);
    $('text').value = '';
  } catch (error) {
    status(`not sent: ${error.message}`);
  }
});

$('join').addEventListener('submit', (event) => {
  event.preventDefault();
  try {
    join($('join-room').value.trim());
    $('join-room').value = '';
  } catch (error) {
    status(error.message);
  }
});

$('leave').addEventListener('click', () => leave());

// ?user=NAME&room=NAME enters at once (a link to share, or two tabs side by side).
const params = new URLSearchParams(location.search);
if (params.has('user')) {
  $('login-user').value = params.get('user');
  $('login-room').value = params.get('room') || 'lobby';
  enter($('login-user').value, $('login-room').value);
}
