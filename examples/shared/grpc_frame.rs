//! gRPC length-prefixed framing of one message, shared by the examples
//! that write request bodies for h2load and read its answers back.

use prost::Message;

pub type Error = Box<dyn std::error::Error>;

pub fn frame(message: &impl Message) -> Result<Vec<u8>, Error> {
    let body = message.encode_to_vec();
    let length = u32::try_from(body.len())?;
    let mut framed = Vec::with_capacity(5 + body.len());
    framed.push(0);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&body);
    Ok(framed)
}

pub fn unframe(bytes: &[u8]) -> Result<&[u8], Error> {
    let (&[flag, a, b, c, d], body) = bytes
        .split_first_chunk::<5>()
        .ok_or("shorter than a gRPC frame header")?;
    if flag != 0 {
        return Err("compressed gRPC frames are not supported".into());
    }
    let length = usize::try_from(u32::from_be_bytes([a, b, c, d]))?;
    if body.len() != length {
        return Err(format!(
            "frame says {length} bytes, {} follow (one message expected)",
            body.len()
        )
        .into());
    }
    Ok(body)
}
