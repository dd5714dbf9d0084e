package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// DecodeRequest parses and validates one request line (with or without its
// newline). The error text is suitable for a bad_request message.
//
// It is strict on purpose: unknown fields, trailing data and a missing or
// different version are rejected, because the version field is how the
// protocol evolves and a lenient decoder would hide a mismatch.
func DecodeRequest(line []byte) (Request, error) {
	line = bytes.TrimSuffix(line, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	if len(line) > MaxRequestSize {
		return Request{}, fmt.Errorf("request is longer than %d bytes", MaxRequestSize)
	}
	if len(bytes.TrimSpace(line)) == 0 {
		return Request{}, errors.New("empty request")
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	// Decoding into a map first distinguishes a missing "v" from v=0 and
	// rejects non-objects such as null, which would decode to a zero Request.
	var raw map[string]json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return Request{}, fmt.Errorf("malformed JSON: %w", err)
	}
	if raw == nil {
		return Request{}, errors.New("malformed JSON: request must be an object")
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Request{}, errors.New("malformed JSON: trailing data after the request object")
	}
	if _, ok := raw["v"]; !ok {
		return Request{}, fmt.Errorf("missing protocol version \"v\" (this supervisor speaks v%d)", ProtocolVersion)
	}
	var req Request
	strict := json.NewDecoder(bytes.NewReader(line))
	strict.DisallowUnknownFields()
	if err := strict.Decode(&req); err != nil {
		return Request{}, fmt.Errorf("malformed request: %w", err)
	}
	if req.V != ProtocolVersion {
		return Request{}, fmt.Errorf("unsupported protocol version %d (this supervisor speaks v%d)", req.V, ProtocolVersion)
	}
	switch req.Op {
	case OpRestart, OpUpgrade, OpPromote, OpRollback:
	case OpStatus:
		if req.Wait {
			return Request{}, errors.New("\"wait\" only applies to ops \"restart\", \"upgrade\", \"promote\" and \"rollback\"")
		}
	case "":
		return Request{}, errors.New("missing \"op\"")
	default:
		return Request{}, fmt.Errorf("unknown op %q (want %q, %q, %q, %q or %q)", req.Op, OpRestart, OpStatus, OpUpgrade, OpPromote, OpRollback)
	}
	if err := checkCanaryPermille(req); err != nil {
		return Request{}, err
	}
	return req, nil
}

// checkCanaryPermille: a share only on a restart, and a share that leaves
// both the canary and the working generation something.
func checkCanaryPermille(req Request) error {
	switch {
	case req.CanaryPermille == 0:
		return nil
	case req.Op != OpRestart:
		return fmt.Errorf("\"canary_permille\" only applies to op %q", OpRestart)
	case req.CanaryPermille < MinCanaryPermille || req.CanaryPermille > MaxCanaryPermille:
		return fmt.Errorf("\"canary_permille\" %d outside %d..%d (thousandths of new connections)", req.CanaryPermille, MinCanaryPermille, MaxCanaryPermille)
	}
	return nil
}
