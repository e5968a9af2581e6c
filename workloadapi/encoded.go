package workloadapi

import (
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// encodedMessage is a message marshalled once and sent on many streams: a
// rotation sends one X509SVIDResponse to every stream that holds the same
// entries, and marshalling it per stream was a thousand copies of the same
// bytes.
type encodedMessage struct{ data []byte }

// sharedCodec is gRPC's proto codec that sends an encodedMessage's bytes as
// they are. They are wrapped in a mem.SliceBuffer, which gRPC never recycles
// (its Free does nothing), so every stream may send the same slice.
// Compression, if a client asks for it, is applied per stream after this.
type sharedCodec struct{ encoding.CodecV2 }

func newSharedCodec() sharedCodec {
	return sharedCodec{encoding.GetCodecV2(protocodec.Name)}
}

func (c sharedCodec) Marshal(v any) (mem.BufferSlice, error) {
	if m, ok := v.(*encodedMessage); ok {
		return mem.BufferSlice{mem.SliceBuffer(m.data)}, nil
	}
	return c.CodecV2.Marshal(v)
}

// encode marshals a message for encodedMessage; the messages sent this way
// always marshal (they hold only strings, bytes and maps of them).
func encode(m proto.Message) []byte {
	data, err := proto.Marshal(m)
	if err != nil {
		panic("workloadapi: marshalling a response: " + err.Error())
	}
	return data
}
