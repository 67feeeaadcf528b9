// useGateway: a GatewayClient for the life of a component (or until its URL
// changes), with its state and last message as React state.
//
// lastMessage is the latest message only: React may render once for several
// messages that arrive together. To see every message, pass onMessage.

import { useCallback, useEffect, useRef, useState } from 'react';

import { GatewayClient } from './index.js';

export function useGateway(url, options = {}) {
  const [state, setState] = useState(url == null ? 'closed' : 'connecting');
  const [lastMessage, setLastMessage] = useState(null);
  const clientRef = useRef(null);
  // Options are read when the connection is made; callbacks always the latest.
  const optionsRef = useRef(options);
  optionsRef.current = options;
  const key = url == null ? null : String(url);

  useEffect(() => {
    if (key === null) {
      setState('closed');
      return undefined;
    }
    const { onMessage, ...clientOptions } = optionsRef.current;
    const client = new GatewayClient(key, clientOptions);
    clientRef.current = client;
    setState(client.state);
    const offState = client.on('state', ({ to }) => setState(to));
    const offMessage = client.on('message', (data) => {
      setLastMessage(data);
      optionsRef.current.onMessage?.(data);
    });
    return () => {
      offState();
      offMessage();
      if (clientRef.current === client) {
        clientRef.current = null;
      }
      client.close();
    };
  }, [key]);

  const send = useCallback((data) => {
    const client = clientRef.current;
    if (client === null) {
      throw new Error('useGateway: no connection (the url is null, or the component is not mounted)');
    }
    client.send(data);
  }, []);

  return { state, lastMessage, send, client: clientRef.current };
}
