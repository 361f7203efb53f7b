//! The agent <-> coordinator protocol, `slipway.agent.v1`.
//!
//! The contract itself, with every message documented, is `slipway/agent/v1/agent.proto` in
//! this crate. Only `coordinator::api` and `agent::session` use these types; everything deeper
//! works on its own plain Rust types.

/// `slipway.agent.v1`: enrolment and the agent session.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("slipway.agent.v1");
}

/// The fully qualified gRPC service name, for logs and health checks.
pub const SERVICE_NAME: &str = "slipway.agent.v1.AgentService";

/// The codec of the generated client and server: prost's, with buffers that start at 1 KiB
/// instead of tonic's 8 KiB (they grow as a message needs). A coordinator holds one session
/// stream per agent, each with an encode and a decode buffer: at 10,000 agents the default
/// was 160 MiB of mostly empty buffers.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(std::marker::PhantomData)
    }
}

/// Starting size of a stream's encode and decode buffers.
pub const CODEC_BUFFER_BYTES: usize = 1024;
/// tonic's default: how much a stream encodes before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(settings())
    }
}

fn settings() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(CODEC_BUFFER_BYTES, YIELD_THRESHOLD)
}
