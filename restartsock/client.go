package restartsock

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
)

// Client errors. Use errors.Is; the returned errors wrap them with the
// socket path and the underlying cause.
var (
	// ErrNoSupervisor: nothing listens at the path (missing, stale or not
	// a socket).
	ErrNoSupervisor = errors.New("no supervisor listening")
	// ErrPermission: the socket file's permissions refused the connect.
	// A supervisor that refuses the peer answers ResultDenied instead.
	ErrPermission = errors.New("permission denied")
	// ErrTimeout: the context's deadline passed before the result arrived.
	ErrTimeout = errors.New("timed out waiting for the supervisor")
	// ErrProtocol: the supervisor's answer was not a valid response.
	ErrProtocol = errors.New("protocol error")
)

// maxResponseLine bounds one line from the supervisor; a status with many
// generations is a few KiB, so this is generous.
const maxResponseLine = 1 << 20

// Restart asks the supervisor at path for a restart and waits for its
// result. With wait, the request queues behind a restart already running
// instead of getting ResultBusy. progress, if not nil, is called for each
// progress line, on the calling goroutine.
func Restart(ctx context.Context, path string, wait bool, progress func(Event)) (Result, error) {
	return roundTrip(ctx, path, Request{V: ProtocolVersion, Op: OpRestart, Wait: wait}, progress)
}

// Upgrade asks the supervisor at path to replace itself with the baton
// binary now at its path, and waits for the result. wait and progress are
// as for Restart.
func Upgrade(ctx context.Context, path string, wait bool, progress func(Event)) (Result, error) {
	return roundTrip(ctx, path, Request{V: ProtocolVersion, Op: OpUpgrade, Wait: wait}, progress)
}

// GetStatus asks the supervisor at path for its status; on success
// Result.Status is set.
func GetStatus(ctx context.Context, path string) (Result, error) {
	res, err := roundTrip(ctx, path, Request{V: ProtocolVersion, Op: OpStatus}, nil)
	if err == nil && res.Result == ResultOK && res.Status == nil {
		return res, fmt.Errorf("%w: %s: status result without a status", ErrProtocol, path)
	}
	return res, err
}

func roundTrip(ctx context.Context, path string, req Request, progress func(Event)) (Result, error) {
	c, err := dial(ctx, path)
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	// Unblocks a pending read or write as soon as ctx ends.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()

	b, err := json.Marshal(req)
	if err != nil {
		return Result{}, fmt.Errorf("encode request: %w", err)
	}
	_, werr := c.Write(append(b, '\n'))
	// Even if the write failed, the supervisor may have answered before
	// closing (a denied peer gets its result without being read), so the
	// answer is still read.

	br := bufio.NewReaderSize(c, 64<<10)
	for {
		line, err := readLine(br)
		if err != nil {
			if werr != nil && ctx.Err() == nil {
				return Result{}, fmt.Errorf("send request to %s: %w", path, werr)
			}
			return Result{}, readError(ctx, path, err)
		}
		var head struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(line, &head); err != nil {
			return Result{}, fmt.Errorf("%w: %s: bad line from supervisor: %w", ErrProtocol, path, err)
		}
		switch head.Type {
		case TypeProgress:
			var ev Event
			if err := json.Unmarshal(line, &ev); err != nil {
				return Result{}, fmt.Errorf("%w: %s: bad progress line: %w", ErrProtocol, path, err)
			}
			if progress != nil {
				progress(ev)
			}
		case TypeResult:
			var res Result
			if err := json.Unmarshal(line, &res); err != nil {
				return Result{}, fmt.Errorf("%w: %s: bad result line: %w", ErrProtocol, path, err)
			}
			if res.Result == "" {
				return Result{}, fmt.Errorf("%w: %s: result line without a result code", ErrProtocol, path)
			}
			return res, nil
		default:
			// A newer supervisor may send line types this client does not
			// know; they are informational by contract.
		}
	}
}

func dial(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	delay := 5 * time.Millisecond
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c, nil
		}
		var errno syscall.Errno
		errors.As(err, &errno)
		switch {
		case errno == syscall.EAGAIN:
			// The listen backlog is full: the supervisor is alive but
			// busy accepting, so try again within the deadline.
			select {
			case <-time.After(delay):
				delay = min(2*delay, 200*time.Millisecond)
				continue
			case <-ctx.Done():
				return nil, ctxError(ctx, path)
			}
		case errno == syscall.ENOENT, errno == syscall.ECONNREFUSED,
			errno == syscall.ENOTSOCK, errno == syscall.ENOTDIR:
			return nil, fmt.Errorf("%w at %s (%w)", ErrNoSupervisor, path, errno)
		case errno == syscall.EACCES, errno == syscall.EPERM:
			return nil, fmt.Errorf("%w connecting to %s (%w)", ErrPermission, path, errno)
		case ctx.Err() != nil:
			return nil, ctxError(ctx, path)
		}
		return nil, fmt.Errorf("connect to %s: %w", path, err)
	}
}

func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > maxResponseLine {
			return nil, fmt.Errorf("%w: line longer than %d bytes", ErrProtocol, maxResponseLine)
		}
		if err == nil {
			return line, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if len(line) > 0 && errors.Is(err, io.EOF) {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

func readError(ctx context.Context, path string, err error) error {
	if ctx.Err() != nil {
		return ctxError(ctx, path)
	}
	if errors.Is(err, ErrProtocol) {
		return fmt.Errorf("%s: %w", path, err)
	}
	// ECONNRESET is what a Unix socket reports when the supervisor closed
	// it with our request still unread; to the user it is the same as EOF.
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("%w: %s: supervisor closed the connection without a result", ErrProtocol, path)
	}
	return fmt.Errorf("read from %s: %w", path, err)
}

func ctxError(ctx context.Context, path string) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w at %s", ErrTimeout, path)
	}
	return fmt.Errorf("request to %s: %w", path, ctx.Err())
}
