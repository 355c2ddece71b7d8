//! Commands from the router's clients, and the pacing of announcements.

use std::collections::HashSet;

use libp2p::PeerId;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{ProviderRecord, RecordKey};
use libp2p::request_response::OutboundRequestId;
use mirrorlet_oci::RouterError;

use super::{Command, EventLoop};
use crate::behaviour::{WITHDRAW_BATCH, WithdrawRequest};

impl EventLoop {
    pub(super) fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Advertise { keys, reply } => {
                // The record goes into the local store at once (so peers asking this node
                // find it, and Kademlia republishes it); the announcements to the nodes
                // closest to each key are paced (see pacing.rs).
                let local = *self.swarm.local_peer_id();
                let mut failed = Vec::new();
                let mut first_error = None;
                for key in keys {
                    let record = ProviderRecord::new(RecordKey::new(&key), local, Vec::new());
                    match self
                        .swarm
                        .behaviour_mut()
                        .kad
                        .store_mut()
                        .add_provider(record)
                    {
                        Ok(()) => {
                            if !self.advertised.contains_key(&key) {
                                // Queued: due again once announced (see `republish.rs`).
                                self.advertised.insert(key.clone(), None);
                                self.announcements.push(key);
                            }
                        }
                        Err(e) => {
                            first_error
                                .get_or_insert_with(|| format!("{e:?} (record store full?)"));
                            failed.push(key);
                        }
                    }
                }
                self.announce_more();
                self.metrics
                    .advertised_keys
                    .set(i64::try_from(self.advertised.len()).unwrap_or(i64::MAX));
                let result = match first_error {
                    None => Ok(()),
                    Some(reason) => Err(RouterError::Advertise { failed, reason }),
                };
                let _ = reply.send(result);
            }
            Command::Withdraw { keys, reply } => {
                for key in &keys {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .stop_providing(&RecordKey::new(key));
                    self.advertised.remove(key);
                }
                // The records are on the nodes closest to each key, which this node cannot
                // list without a query per key: tell the peers it is connected to and those
                // in its routing table (all of a small cluster; in a large one, records
                // elsewhere expire with their TTL, and a dead provider costs each node one
                // failed attempt before the registry skips it).
                let mut told: HashSet<PeerId> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.connections > 0)
                    .map(|(id, _)| *id)
                    .collect();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    told.extend(bucket.iter().map(|e| *e.node.key.preimage()));
                }
                told.retain(|p| !self.is_unreachable(p));
                let mut sent = HashSet::new();
                for batch in keys.chunks(WITHDRAW_BATCH) {
                    for peer in &told {
                        let req = WithdrawRequest {
                            keys: batch.to_vec(),
                        };
                        sent.insert(self.swarm.behaviour_mut().withdraw.send_request(peer, req));
                    }
                }
                self.metrics
                    .advertised_keys
                    .set(i64::try_from(self.advertised.len()).unwrap_or(i64::MAX));
                // Answer once every peer has acknowledged (or failed, at the latest after
                // the request timeout), so that a withdrawal at shutdown really goes out.
                if sent.is_empty() {
                    let _ = reply.send(());
                } else {
                    self.withdrawals.push((sent, reply));
                }
            }
            Command::Lookup { key, tx } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(RecordKey::new(&key));
                self.lookups.insert(id, tx);
            }
            Command::Owners { key, reply } => {
                let _ = reply.send(self.rank_owners(&key));
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// A withdrawal request to a peer finished (answered or failed).
    pub(super) fn withdrawal_done(&mut self, id: OutboundRequestId) {
        for (pending, _) in &mut self.withdrawals {
            pending.remove(&id);
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.withdrawals)
            .into_iter()
            .partition(|(p, _)| p.is_empty());
        self.withdrawals = waiting;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }

    /// Starts announcements from the queue while the pacing window has room.
    pub(super) fn announce_more(&mut self) {
        self.start_announcements();
        self.metrics
            .announcements_pending
            .set(i64::try_from(self.announcements.pending()).unwrap_or(i64::MAX));
    }

    fn start_announcements(&mut self) {
        while let Some((key, attempt)) = self.announcements.next() {
            if !self.advertised.contains_key(&key) {
                continue; // withdrawn while queued
            }
            match self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(RecordKey::new(&key))
            {
                Ok(id) => self.announcements.started(id, key, attempt),
                Err(e) => {
                    tracing::warn!(%key, error = ?e, "announcing a key failed");
                    self.announced(&key, false);
                }
            }
        }
    }
}
