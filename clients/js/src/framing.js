// How application messages become WebSocket messages and back: kept apart
// from the connection's state machine (client.js) so that another wire
// format (numbered messages with acks, for a reliable mode) changes this
// part only.
//
// A framing is a factory: `create({sendRaw})` gives the per-client object
//   protocols          subprotocols to offer (before the application's own)
//   encode(data)       an application message -> what goes on the socket
//   decode(data)       a socket message -> the application message, or
//                      undefined when the framing consumed it itself
//   opened({resumed, protocol})   a socket reached open (before the queue is sent)
//   closed()           the socket closed
// sendRaw(data) writes on the open socket, for a framing's own messages.

/** Messages as they are: what the gateway's routes expect unless they say otherwise. */
export const plainFraming = Object.freeze({
  create() {
    return {
      protocols: [],
      encode: (data) => data,
      decode: (data) => data,
      opened() {},
      closed() {},
    };
  },
});
