// Types of @gateway/client/react (src/react.js).

import type { GatewayClient, GatewayOptions, Message, Outgoing, State } from './index.js';

export interface UseGatewayOptions extends GatewayOptions {
  /** Called for every message (lastMessage shows only the latest one React rendered). */
  onMessage?: (data: Message) => void;
}

export interface UseGatewayResult {
  state: State;
  lastMessage: Message | null;
  /** Sends now when open, else queues (see GatewayClient.send). */
  send(data: Outgoing): void;
  /** The client of the current connection, or null before the effect ran. */
  client: GatewayClient | null;
}

/**
 * A GatewayClient for the component's life; a new one when `url` changes,
 * none while it is null. Options are read when a connection is made.
 */
export declare function useGateway(url: string | URL | null | undefined, options?: UseGatewayOptions): UseGatewayResult;
